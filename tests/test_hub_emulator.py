"""The real huggingface_hub client pushes to and pulls from the local hub emulator."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, file_exists, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers.utils import hub as transformers_hub

from .helpers import tiny_model
from .hub_emulator import running_hub

REPO = "someone/tiny-adapter"
README = "---\nlibrary_name: peft\ntags:\n- stoc\n---\n\n# Tiny adapter\n"


@pytest.fixture
def hub():
    with running_hub() as running:
        yield running


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "upload"
    root.mkdir()
    (root / "README.md").write_text(README)
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "STOC", "k": 7}, indent=2))
    generator = torch.Generator().manual_seed(0)
    save_file(
        {"indices": torch.arange(7, dtype=torch.int64), "values": torch.randn(7, generator=generator)},
        str(root / "adapter_model.safetensors"),
    )
    return root


def test_upload_folder_then_download_into_a_fresh_cache_gives_the_same_bytes(hub, folder, tmp_path):
    api = HfApi()
    url = api.create_repo(REPO, exist_ok=True)
    assert url.repo_id == REPO and url.endpoint == hub.endpoint
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # second call answers 409, tolerated by exist_ok
    info = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="Add adapter")

    names = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    cache = tmp_path / "fresh-cache"
    for name in names:
        path = hf_hub_download(REPO, name, cache_dir=cache)
        assert path.startswith(str(cache)) and f"/snapshots/{info.oid}/" in path
        with open(path, "rb") as downloaded:
            assert downloaded.read() == (folder / name).read_bytes()
    tensors = load_file(hf_hub_download(REPO, "adapter_model.safetensors", cache_dir=cache))
    assert torch.equal(tensors["indices"], torch.arange(7))

    # Contents travelled inline in the NDJSON commit: no LFS, no Xet request reached the server.
    assert all("lfs" not in r.path and "xet" not in r.path for r in hub.requests)
    commits = hub.commits(REPO)
    assert [c.title for c in commits] == ["initial commit", "Add adapter"]
    assert sorted(commits[-1].added) == names and commits[-1].oid == info.oid
    assert hub.read(REPO, "adapter_config.json") == (folder / "adapter_config.json").read_bytes()
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", *names]


def test_default_cache_is_the_emulators_and_revisions_pin_old_contents(hub, folder):
    api = HfApi()
    api.create_repo(REPO)
    first = api.upload_folder(folder_path=folder, repo_id=REPO)
    second = api.upload_file(path_or_fileobj=b'{"k": 9}', path_in_repo="adapter_config.json", repo_id=REPO)
    assert second.oid != first.oid and hub.commits(REPO)[-1].added == ("adapter_config.json",)

    latest = hf_hub_download(REPO, "adapter_config.json")
    assert latest.startswith(str(hub.cache_dir))
    with open(latest, "rb") as f:
        assert f.read() == b'{"k": 9}'
    with open(hf_hub_download(REPO, "adapter_config.json", revision=first.oid), "rb") as f:
        assert f.read() == (folder / "adapter_config.json").read_bytes()

    # Re-uploading unchanged files makes no commit (the pre-upload answer carries each file's blob id).
    api.upload_folder(folder_path=folder, repo_id=REPO, allow_patterns=["README.md"])
    assert len(hub.commits(REPO)) == 3


def test_file_exists_model_info_and_model_card(hub, folder):
    api = HfApi()
    api.create_repo(REPO)
    api.upload_folder(folder_path=folder, repo_id=REPO)

    assert file_exists(REPO, "adapter_model.safetensors")  # module-level helper, bound to an HfApi made at import
    assert not file_exists(REPO, "missing.bin")
    assert not file_exists("someone/no-such-repo", "adapter_config.json")
    assert api.file_exists(REPO, "README.md")

    info = api.model_info(REPO)
    assert info.id == REPO and info.sha == hub.commits(REPO)[-1].oid
    assert sorted(s.rfilename for s in info.siblings) == sorted(hub.files(REPO))
    assert info.card_data.library_name == "peft" and info.tags == ["stoc"]

    card = ModelCard.load(REPO)
    assert card.data.tags == ["stoc"] and "# Tiny adapter" in card.text


def test_missing_repo_file_and_revision_raise_the_clients_not_found_errors(hub, folder):
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("someone/no-such-repo", "README.md")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("gpt2", "config.json")  # an id without namespace is not hosted here either
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("someone/no-such-repo")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_folder(folder_path=folder, repo_id="someone/no-such-repo")  # repo must be created first

    api.create_repo(REPO)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "adapter_model.safetensors")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, ".gitattributes", revision="v2")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)  # without exist_ok an existing repo is an error, as on the Hub
    assert conflict.value.response.status_code == 409


def test_writes_need_the_token_and_a_subprocess_inherits_the_settings(hub, folder):
    with pytest.raises(HfHubHTTPError) as denied:
        HfApi(token="hf_wrong").create_repo(REPO)
    assert denied.value.response.status_code == 401
    assert hub.requests[-1].authorization == "Bearer hf_wrong"

    HfApi().create_repo(REPO)  # the default client reads HF_TOKEN, which running_hub set
    HfApi().upload_folder(folder_path=folder, repo_id=REPO)
    script = (
        "from huggingface_hub import file_exists, hf_hub_download\n"
        f"print(file_exists({REPO!r}, 'README.md'), open(hf_hub_download({REPO!r}, 'README.md')).read() == {README!r})"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_server_binds_loopback_only_stops_and_restores_the_client_settings(folder):
    before = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    with running_hub() as hub:
        assert hub._server.server_address[0] == "127.0.0.1"
        assert constants.ENDPOINT == hub.endpoint and not constants.HF_HUB_OFFLINE
        HfApi().create_repo(REPO)
        with pytest.raises(RuntimeError, match="already running"), running_hub():
            pass
        port = hub.port
    after = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    assert after == before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not hub.root.exists()


def test_peft_push_to_hub_then_from_pretrained_round_trip(hub):
    transformers_hub.hf_api()  # transformers' shared client may predate the emulator: it must be re-pointed
    config = LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    model = get_peft_model(tiny_model("bert"), config)
    model.push_to_hub(REPO)  # creates the repo, looks for a README (404), commits
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(hub.files(REPO))

    loaded = PeftModel.from_pretrained(tiny_model("bert"), REPO)  # file_exists + hf_hub_download
    pushed = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    pulled = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert pushed.keys() == pulled.keys() and len(pushed) == 8
    assert all(torch.equal(pushed[k], pulled[k]) for k in pushed)
    assert any(r.path.endswith("/resolve/main/adapter_model.safetensors") and r.method == "GET" for r in hub.requests)

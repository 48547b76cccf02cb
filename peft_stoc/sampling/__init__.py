"""The draw: which k entries one optimizer step updates.

Importance I = |μ ⊙ θ ⊙ g| (importance) over chunks of rows (chunks); every entry's random key depends only on
(seed, step, entry) (entry_keys), so masks are the same in every memory mode, chunking and world size; thinning draws
exactly while computing keys only for entries that can win; selection is the draw over dense gradients, streaming the
same draw fed one gradient at a time during the backward, with the best keys so far in a pool (key_pool);
one_thread runs passes of many small operations on one CPU thread.
"""

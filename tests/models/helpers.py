"""Helpers shared by the checkpoint tests: padding and the error metric."""
import numpy as np


def pad_batch(seqs, side, pad_id):
    """`(tokens int32 [B, T], mask bool [B, T])` with each row padded on `side`."""
    T = max(len(s) for s in seqs)
    tokens = np.full((len(seqs), T), pad_id, np.int32)
    mask = np.zeros((len(seqs), T), bool)
    for b, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        tokens[b, cols] = s
        mask[b, cols] = True
    return tokens, mask


def rel_err(ours, theirs):
    """||ours - theirs|| / ||theirs|| (Frobenius)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def attended_rows(logits_BTV, mask_BT):
    """Per row, the logits at attended positions, in order: list of `[len_b, V]`."""
    logits_BTV, mask_BT = np.asarray(logits_BTV), np.asarray(mask_BT)
    return [logits_BTV[b][mask_BT[b]] for b in range(mask_BT.shape[0])]

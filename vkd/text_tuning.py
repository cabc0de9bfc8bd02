"""The report encoder's tuning for real collections (OpenI's defaults), behind two hooks of
model.TextEncoder: `ReportTuning.augment` (training only) and `ReportTuning.attention_mask`, and the
attention pooling that replaces the mean of the token features. The demo uses none of it.

Why: OpenI has about 2,600 training reports, and a report names a rare finding in one or two words
among many normal ones. Word dropout keeps the teacher from leaning on any one word; a report's
findings do not depend on the order of its sentences; "no" in "No pneumothorax." should not reach
"effusion" in the next sentence; and a learned query can weigh the one word that matters.
"""
import torch
import torch.nn as nn

PAD, UNK = 0, 1                     # token ids of [PAD] and [UNK] (data.train_tokenizer)


class ReportTuning:
    """What TextEncoder does beyond the plain transformer, from its VKDConfig (no weights of its
    own)."""

    def __init__(self, cfg):
        self.word_dropout = cfg.word_dropout
        self.sentence_shuffle = cfg.sentence_shuffle
        self.sentence_attention = cfg.sentence_attention
        uses_sentences = cfg.sentence_shuffle or cfg.sentence_attention
        assert not uses_sentences or cfg.sentence_end >= 0, \
            "sentence_shuffle/attention need sentence_end, the '.'"
        self.sentence_end = cfg.sentence_end if uses_sentences else None
        self.heads = cfg.text_heads

    def augment(self, t):
        """Training only: each report's sentences in a random order (sentence_shuffle), then each
        token replaced by [UNK] with probability word_dropout, never [PAD], nor "." with
        sentence_attention (a dropped "." would join two sentences). (B, T) -> (B, T); draws from
        the global RNG."""
        if self.sentence_shuffle:
            t = shuffle_sentences(t, self.sentence_end)
        if self.word_dropout > 0:
            dropped = torch.rand(t.shape, device=t.device) < self.word_dropout        # (B, T)
            dropped &= t > UNK
            if self.sentence_attention:
                dropped &= t != self.sentence_end
            t = t.masked_fill(dropped, UNK)
        return t

    def attention_mask(self, t):
        """(B * heads, T, T) mask for nn.TransformerEncoder with sentence_attention: a token attends
        only to its own sentence (sentence_mask, padding included); else None. Row b * heads + h is
        report b's mask for head h, the order the encoder reads."""
        if not self.sentence_attention:
            return None
        return sentence_mask(t, self.sentence_end).repeat_interleave(self.heads, dim=0)


def sentence_ids(t, end):
    """(B, T) token ids -> (B, T): the number of the sentence each token is in (0, 1, ...); the
    token `end` closes a sentence."""
    ends = (t == end).long()
    return ends.cumsum(1) - ends


def sentence_mask(t, end):
    """(B, T) token ids -> (B, T, T) attention mask, True where token i may not attend to token j: j
    is in another sentence, or is padding. A padding token sees only itself (the pooling ignores
    it), so no row is all True. In training with shuffle_sentences, a last sentence without "." (a
    report cut at max_len, or without a full stop) joins the sentence shuffled after it; like "1.5
    cm" (shuffle_sentences), noise only."""
    sentence = sentence_ids(t, end)
    allowed = (sentence[:, :, None] == sentence[:, None, :]) & (t != PAD)[:, None, :]
    allowed |= torch.eye(t.shape[1], dtype=torch.bool, device=t.device)
    return ~allowed


def shuffle_sentences(t, end):
    """Report tokens (B, T) with each report's sentences in a random order; a sentence ends at the
    token `end` (the last one may not), and the padding stays at the end. Draws from the global RNG,
    as dropout does. The tokenizer splits "." off everywhere, so "1.5 cm" or "1. No effusion" also
    end a sentence: noise only."""
    sentence = sentence_ids(t, end)                             # (B, T): the sentence of each token
    key = torch.rand(t.shape, device=t.device).gather(1, sentence)      # (B, T): a key per sentence
    # above every key: padding sorts last
    key = key.masked_fill(t == PAD, 2.0)
    return t.gather(1, key.argsort(dim=1, stable=True))         # stable: a sentence keeps its order


class AttentionPooling(nn.Module):
    """Token features (B, T, C) -> one report feature (B, C), by H learned queries:

        a_h(i) = softmax_i(w_h . h_i)  over the non-padding tokens i, for each query w_h
        r      = W [sum_i a_1(i) h_i, ..., sum_i a_H(i) h_i]

    Why not the mean: a report is mostly normal findings, and the mean gives a one-word finding
    ("pneumothorax") a weight of 1/T in a long report; a query can put most of its weight on it.
    Padding gets a weight of zero.
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.score = nn.Linear(dim, heads)                   # w_h: one query per head
        self.out = nn.Linear(heads * dim, dim)               # W

    def forward(self, h, padding):
        scores = self.score(h).float()                                        # (B, T, H)
        scores = scores.masked_fill(padding.unsqueeze(-1), torch.finfo(scores.dtype).min)
        a = scores.softmax(dim=1).to(h.dtype)                                 # (B, T, H)
        pooled = torch.einsum("bth,btc->bhc", a, h)                           # (B, H, C)
        return self.out(pooled.flatten(1))                                    # (B, C)

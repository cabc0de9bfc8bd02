"""Model: image encoder, report encoder, Gaussian prior/posterior, classifier, and the VKD objective.

Notation (van Sonsbeek et al., IPMI 2021): x image, t report text, y the 14 labels, z the latent.

    prior (student, test time)   p(z | x)    = N(mu_p(x),    diag exp(logvar_p(x)))
    posterior (teacher)          q(z | x, t) = N(mu_q(x, t), diag exp(logvar_q(x, t)))
    classifier                   p(y | z)    = Bernoulli(sigmoid(f(z)))

    ELBO:  log p(y | x) >= E_q(z|x,t)[log p(y | z)] - beta * KL(q(z|x,t) || p(z|x))        (eq. 1)

The authors' code made other choices; each is a switch of VKDConfig, off by default: q(z | t) instead of
q(z | x, t) (posterior_reads_image), f([z; h_x]) instead of f(z) (classifier_reads_image), KL(p || q) in eq. 1
(kl_direction), the mean of L samples fed to f (average_samples); train.beta_at has their cyclical beta.

Methods sharing this code: `vkd` (the above plus a BCE on prior samples), `image` (BCE on f(mu_p(x)) only: the
baseline VKD must beat), `text` (BCE on posterior samples only: an upper bound that reads the report).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbones import TorchvisionEncoder

METHODS = ("vkd", "image", "text")
PAD, UNK = 0, 1                     # token ids of [PAD] and [UNK] (data.train_tokenizer)


@dataclass
class VKDConfig:
    num_labels: int = 14
    latent_dim: int = 64
    backbone: str = "cnn"           # cnn | resnet18 | densenet121
    cnn_width: int = 16             # channels of the compact CNN's first stage
    vocab_size: int = 2000
    max_len: int = 64               # report tokens (train.py derives it from the training reports)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_pooling: str = "mean"      # attention | mean: how token features become one report feature
    dropout: float = 0.1
    word_dropout: float = 0.0       # training only: each report token becomes [UNK] with this probability
    sentence_shuffle: bool = False  # training only: each report's sentences in a random order (shuffle_sentences)
    sentence_attention: bool = False  # a token attends only to the tokens of its own sentence (sentence_mask)
    sentence_end: int = -1          # the token id that ends a sentence, "." (train.py reads it from the tokenizer)
    method: str = "vkd"
    # The authors' design choices, off by default (study.py measures them), with train.py's flag for each:
    posterior_reads_image: bool = True     # q(z | x, t) of eq. 1; False: q(z | t)       (--posterior-input report)
    classifier_reads_image: bool = False   # f(z); True: f([z; h_x])                      (--classifier-input z+image)
    kl_direction: str = "qp"               # KL(q || p) of eq. 1; "pq": KL(p || q)       (--kl-direction pq)
    average_samples: bool = False          # BCE averaged over the L samples; True: BCE of f(mean of the L samples)
                                           #                                              (--average-samples)


# ---------------------------------------------------------------------------------------------- encoders

def conv_bn(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ResidualStage(nn.Module):
    """Downsample by 2 with a strided conv, then one residual 3x3 block."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.down = conv_bn(c_in, c_out, 2)
        self.block = nn.Sequential(conv_bn(c_out, c_out, 1), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(c_out))

    def forward(self, h):
        h = self.down(h)
        return F.relu(h + self.block(h))


class ImageEncoder(nn.Module):
    """Compact CNN for 1-channel radiographs: (B, 1, H, W) -> (B, out_dim). Trains on a CPU at 128 px."""

    def __init__(self, width):
        super().__init__()
        w = width
        self.stem = conv_bn(1, w, 2)                                         # (B, w, H/2, W/2)
        self.stages = nn.Sequential(ResidualStage(w, 2 * w), ResidualStage(2 * w, 4 * w),
                                    ResidualStage(4 * w, 8 * w))             # (B, 8w, H/16, W/16)
        self.out_dim = 8 * w

    def forward(self, x):
        return self.stages(self.stem(x)).mean(dim=(2, 3))                    # global average pool: (B, 8w)


class TextEncoder(nn.Module):
    """Transformer over report tokens: (B, T) ids -> (B, text_dim), pooled over the non-padding tokens by
    attention (AttentionPooling) or by their mean (text_pooling="mean").

    With cfg.sentence_attention a token attends only to the tokens of its own sentence (sentence_mask): "no" in
    "No pneumothorax." cannot reach "effusion" in the next sentence, and a sentence's token features depend on the
    rest of the report only through their positions. The pooling then reads across sentences.

    Two augmentations, in training only, against overfitting 2,600 training reports (OpenI): word dropout
    (cfg.word_dropout: each token becomes [UNK] with probability p, so the teacher cannot lean on any one word) and
    sentence shuffling (cfg.sentence_shuffle: a report's findings do not depend on the order of its sentences).

    Attention runs over the T tokens of each report (batch_first=True), never across the reports of a batch,
    and positional embeddings are indexed by token position, not batch position. The authors' code got both
    wrong: it fed batch-first tensors to a sequence-first attention (so each token attended across the batch)
    and indexed its positional encoding by the position in the batch.
    """

    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_dim, padding_idx=PAD)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.text_dim)
        layer = nn.TransformerEncoderLayer(cfg.text_dim, cfg.text_heads, 4 * cfg.text_dim, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)
        assert cfg.text_pooling in ("attention", "mean"), f"text_pooling: attention or mean, not {cfg.text_pooling!r}"
        self.pool = AttentionPooling(cfg.text_dim, cfg.text_heads) if cfg.text_pooling == "attention" else None
        self.word_dropout = cfg.word_dropout
        uses_sentences = cfg.sentence_shuffle or cfg.sentence_attention
        assert not uses_sentences or cfg.sentence_end >= 0, "sentence_shuffle/attention need sentence_end, the '.'"
        self.sentence_end = cfg.sentence_end if uses_sentences else None
        self.sentence_shuffle, self.sentence_attention = cfg.sentence_shuffle, cfg.sentence_attention
        self.heads = cfg.text_heads

    def forward(self, t):
        B, T = t.shape
        assert T <= self.position_embedding.num_embeddings, f"{T} tokens > max_len"
        if self.training and self.sentence_shuffle:
            t = shuffle_sentences(t, self.sentence_end)
        padding = t == PAD                                                        # (B, T), True = ignore
        if self.training and self.word_dropout > 0:                              # word dropout, never on [PAD]
            dropped = (torch.rand(t.shape, device=t.device) < self.word_dropout) & (t > UNK)        # (B, T)
            if self.sentence_attention:
                dropped &= t != self.sentence_end                                # nor on "." (it would join two)
            t = t.masked_fill(dropped, UNK)
        positions = torch.arange(T, device=t.device)
        h = self.token_embedding(t) + self.position_embedding(positions)[None]  # (B, T, C)
        if self.sentence_attention:
            mask = sentence_mask(t, self.sentence_end)                           # (B, T, T), padding included
            mask = mask.repeat_interleave(self.heads, dim=0)     # (B * heads, T, T): row b * heads + h, per head
            h = self.norm(self.encoder(h, mask=mask))                            # (B, T, C)
        else:
            h = self.norm(self.encoder(h, src_key_padding_mask=padding))         # (B, T, C)
        if self.pool is not None:
            return self.pool(h, padding)                                         # (B, C)
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1)                      # mean: (B, C)


def sentence_ids(t, end):
    """(B, T) token ids -> (B, T): the number of the sentence each token is in (0, 1, ...); `end` closes one."""
    ends = (t == end).long()
    return ends.cumsum(1) - ends


def sentence_mask(t, end):
    """(B, T) token ids -> (B, T, T) attention mask, True where token i may not attend to token j: j is in another
    sentence, or is padding. A padding token sees only itself (the pooling ignores it), so no row is all True.
    In training with shuffle_sentences, a last sentence without "." (a report cut at max_len, or without a full
    stop) joins the sentence shuffled after it; like "1.5 cm" (shuffle_sentences), noise only."""
    sentence = sentence_ids(t, end)
    allowed = (sentence[:, :, None] == sentence[:, None, :]) & (t != PAD)[:, None, :]
    allowed |= torch.eye(t.shape[1], dtype=torch.bool, device=t.device)
    return ~allowed


def shuffle_sentences(t, end):
    """Report tokens (B, T) with each report's sentences in a random order; a sentence ends at the token `end`
    (the last one may not), and the padding stays at the end. Draws from the global RNG, as dropout does.
    The tokenizer splits "." off everywhere, so "1.5 cm" or "1. No effusion" also end a sentence: noise only."""
    sentence = sentence_ids(t, end)                                           # (B, T): the sentence of each token
    key = torch.rand(t.shape, device=t.device).gather(1, sentence)            # (B, T): one random key per sentence
    key = key.masked_fill(t == PAD, 2.0)                                      # above every key: padding sorts last
    return t.gather(1, key.argsort(dim=1, stable=True))                       # stable: a sentence keeps its order


class AttentionPooling(nn.Module):
    """Token features (B, T, C) -> one report feature (B, C), by H learned queries:

        a_h(i) = softmax_i(w_h . h_i)  over the non-padding tokens i, for each of the H queries w_h
        r      = W [sum_i a_1(i) h_i, ..., sum_i a_H(i) h_i]

    Why not the mean: a report is mostly normal findings, and the mean gives a one-word finding ("pneumothorax")
    a weight of 1/T in a long report; a query can put most of its weight on it. Padding gets a weight of zero.
    """

    def __init__(self, dim, heads):
        super().__init__()
        self.score = nn.Linear(dim, heads)                   # w_h: one query per head
        self.out = nn.Linear(heads * dim, dim)               # W

    def forward(self, h, padding):
        scores = self.score(h).float()                                            # (B, T, H)
        scores = scores.masked_fill(padding.unsqueeze(-1), torch.finfo(scores.dtype).min)
        a = scores.softmax(dim=1).to(h.dtype)                                     # (B, T, H), sums to 1 over T
        pooled = torch.einsum("bth,btc->bhc", a, h)                               # (B, H, C)
        return self.out(pooled.flatten(1))                                        # (B, C)


# --------------------------------------------------------------------------------------- Gaussian latent

class GaussianHead(nn.Module):
    """features -> (mu, logvar) of a diagonal Gaussian. Heads output log-variances; sigma = exp(0.5 logvar)."""

    def __init__(self, in_dim, latent_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, 2 * latent_dim))

    def forward(self, h):
        mu, logvar = self.net(h).chunk(2, dim=-1)                            # (B, D) each
        return mu, logvar.clamp(-10.0, 10.0)                                 # keeps exp() finite in low precision


def reparameterize(mu, logvar, num_samples=1):
    """z = mu + sigma * eps, eps ~ N(0, I), sigma = exp(0.5 * logvar): (S, B, D), differentiable in mu, logvar."""
    eps = torch.randn((num_samples, *mu.shape), device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(q || p) between diagonal Gaussians, summed over latent dims: (B, D) x 4 -> (B,).

    KL = 1/2 sum_d [ logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1 ]
    """
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)


def positive_weights(y, mode="sqrt"):
    """(K,) weight of a positive label in the BCE, from the training labels y (N, K) (NaN = not observed):
    sqrt(negatives / positives) per label ("sqrt"), or 1 ("none"). Why: a label with 1% positives otherwise
    gets nearly all of its gradient from negatives; the square root softens the full ratio, which overshoots."""
    y = torch.as_tensor(y, dtype=torch.float32)
    if mode == "none":
        return torch.ones(y.shape[1])
    assert mode == "sqrt", f"pos_weight: sqrt or none, not {mode!r}"
    positives = torch.nansum(y, 0)
    negatives = (~torch.isnan(y)).sum(0) - positives
    return (negatives / positives.clamp(min=1)).clamp(min=1).sqrt()


def bce(logits, y, pos_weight=None):
    """-log p(y | z) summed over labels, averaged over samples and batch; logits (S, B, K) or (B, K).
    pos_weight (K,): the weight of the term of a positive label (positive_weights), 1 by default.

    A NaN label is not observed (an uncertain MIMIC label under --uncertain ignore): it adds nothing to the
    loss and no gradient."""
    y = y.expand_as(logits).float()
    observed = ~torch.isnan(y)
    terms = F.binary_cross_entropy_with_logits(logits.float(), torch.where(observed, y, 0.0), reduction="none",
                                               pos_weight=pos_weight)
    return torch.where(observed, terms, 0.0).sum(-1).mean()


# ------------------------------------------------------------------------------------------------- VKD

class VKD(nn.Module):
    def __init__(self, cfg, backbone_weights=None, pos_weight=None):
        super().__init__()
        assert cfg.method in METHODS, f"method must be one of {METHODS}, got {cfg.method!r}"
        assert cfg.kl_direction in ("qp", "pq"), f"kl_direction: qp or pq, not {cfg.kl_direction!r}"
        self.cfg = cfg
        self.image_encoder = (ImageEncoder(cfg.cnn_width) if cfg.backbone == "cnn"
                              else TorchvisionEncoder(cfg.backbone, backbone_weights))
        image_dim = self.image_encoder.out_dim
        self.prior = GaussianHead(image_dim, cfg.latent_dim)                                    # p(z | x)
        self.text_encoder = TextEncoder(cfg) if cfg.method in ("vkd", "text") else None
        posterior_dim = cfg.text_dim + (image_dim if cfg.posterior_reads_image else 0)
        self.posterior = (GaussianHead(posterior_dim, cfg.latent_dim)                            # q(z | x, t) or q(z | t)
                          if self.text_encoder is not None else None)
        classifier_dim = cfg.latent_dim + (image_dim if cfg.classifier_reads_image else 0)
        self.classifier = nn.Linear(classifier_dim, cfg.num_labels)                             # f(z) or f([z; h_x])
        # a training choice (positive_weights), not a weight of the model: left out of the state_dict
        weight = torch.ones(cfg.num_labels) if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight, persistent=False)

    def encode_prior(self, x):
        assert x.dim() == 4 and x.shape[1] == 1, f"x must be (B, 1, H, W), got {tuple(x.shape)}"
        h_x = self.image_encoder(x)                                          # (B, F)
        return h_x, *self.prior(h_x)

    def encode_posterior(self, h_x, t):
        h_t = self.text_encoder(t)                                           # (B, C)
        if not self.cfg.posterior_reads_image:
            return self.posterior(h_t)                                       # q(z | t)
        return self.posterior(torch.cat([h_x, h_t], dim=-1))                 # q(z | x, t): fusion by concatenation

    def classify(self, z, h_x):
        """Logits f(z) of z (B, D) or samples (S, B, D); f([z; h_x]) with cfg.classifier_reads_image."""
        if self.cfg.classifier_reads_image:
            z = torch.cat([z, h_x.expand(*z.shape[:-1], -1)], dim=-1)
        return self.classifier(z)

    def sample(self, mu, logvar, num_samples):
        """L samples z ~ N(mu, diag exp(logvar)): (L, B, D), or their mean (1, B, D) with cfg.average_samples.
        Averaging many samples (the authors use 100) shrinks the noise by sqrt(L): z becomes nearly mu."""
        z = reparameterize(mu, logvar, num_samples)
        return z.mean(0, keepdim=True) if self.cfg.average_samples else z

    def kl(self, mu_q, logvar_q, mu_p, logvar_p):
        """KL(q || p) averaged over the batch (eq. 1); KL(p || q) with cfg.kl_direction == "pq"."""
        q, p = (mu_q.float(), logvar_q.float()), (mu_p.float(), logvar_p.float())
        return (gaussian_kl(*p, *q) if self.cfg.kl_direction == "pq" else gaussian_kl(*q, *p)).mean()

    def forward(self, x, t, y, beta=1.0, prior_weight=1.0, num_samples=1):
        """Loss parts for one batch. x (B, 1, H, W) float, t (B, T) token ids, y (B, K) in {0, 1};
        beta a float or a 0-dim tensor.

        vkd:   loss = BCE(f(z_q)) + prior_weight * BCE(f(z_p)) + beta * KL(q || p),  z_q ~ q(z|x,t), z_p ~ p(z|x)
               The first and last terms are the negative ELBO (eq. 1). The middle term trains the prior path
               that is used at test time directly: in eq. 1 the classifier only ever sees posterior samples.
        image: loss = BCE(f(mu_p(x)))
        text:  loss = BCE(f(z_q)),  z_q ~ q(z|x,t)
        Every BCE weighs the term of a positive label by self.pos_weight (positive_weights; 1 by default).
        The authors' switches (VKDConfig) act inside encode_posterior, classify, sample and kl.
        """
        method = self.cfg.method
        h_x, mu_p, logvar_p = self.encode_prior(x)
        zero = torch.zeros((), device=x.device)
        if method == "image":
            bce_prior = bce(self.classify(mu_p, h_x), y, self.pos_weight)
            return {"loss": bce_prior, "bce_posterior": zero, "bce_prior": bce_prior, "kl": zero}
        mu_q, logvar_q = self.encode_posterior(h_x, t)
        bce_posterior = bce(self.classify(self.sample(mu_q, logvar_q, num_samples), h_x), y, self.pos_weight)
        if method == "text":
            return {"loss": bce_posterior, "bce_posterior": bce_posterior, "bce_prior": zero, "kl": zero}
        bce_prior = bce(self.classify(self.sample(mu_p, logvar_p, num_samples), h_x), y, self.pos_weight)
        kl = self.kl(mu_q, logvar_q, mu_p, logvar_p)
        loss = bce_posterior + prior_weight * bce_prior + beta * kl
        return {"loss": loss, "bce_posterior": bce_posterior, "bce_prior": bce_prior, "kl": kl}

    @torch.no_grad()
    def predict(self, x, num_samples=0):
        """Image-only inference from the prior p(z|x); the text encoder never runs here.

        num_samples=0: probabilities sigmoid(f(mu_p)), std is zero.
        num_samples=S: mean and std of sigmoid(f(z_s)) over S samples z_s ~ p(z|x) (std = per-image uncertainty).
        Returns (probabilities (B, K), std (B, K)).
        """
        h_x, mu_p, logvar_p = self.encode_prior(x)
        if num_samples == 0:
            probabilities = torch.sigmoid(self.classify(mu_p, h_x).float())
            return probabilities, torch.zeros_like(probabilities)
        z = reparameterize(mu_p, logvar_p, num_samples)                                       # (S, B, D)
        samples = torch.sigmoid(self.classify(z, h_x).float())                                # (S, B, K)
        return samples.mean(0), samples.std(0, correction=0)

    @torch.no_grad()
    def predict_with_text(self, x, t):
        """The `text` upper bound: sigmoid(f(mu_q(x, t))). Reads the report, so it is not a test-time model."""
        h_x, _, _ = self.encode_prior(x)
        mu_q, _ = self.encode_posterior(h_x, t)
        return torch.sigmoid(self.classify(mu_q, h_x).float())


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def describe(model):
    parts = {"image encoder": model.image_encoder, "text encoder": model.text_encoder}
    return ", ".join(f"{name} {count_parameters(m) / 1e6:.2f}M" for name, m in parts.items() if m is not None) + \
        f", total {count_parameters(model) / 1e6:.2f}M"


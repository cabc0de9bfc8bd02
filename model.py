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
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from reports import DataError

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


class TorchvisionEncoder(nn.Module):
    """resnet18 / densenet121 from torchvision for gray radiographs: (B, 1, H, W) -> (B, out_dim).

    weights: None (random init), "imagenet" (torchvision's IMAGENET1K_V1 through its weights API: read from
    torch.hub.get_dir()/checkpoints/, downloaded there once), or the path of a local torchvision state_dict.
    The modules are the same for all three, so a checkpoint loads into VKD(cfg) with no weights (no download).

    Gray input: the network keeps its 3-channel first conv and sees x replicated to RGB, which is exactly a
    1-channel conv with the weights summed over RGB. ImageNet weights expect u_c = (p - mean_c) / std_c for a
    pixel p in [0, 1] (the same p in R, G, B for a gray image); the model gets x = (p - m) / s (data.normalise,
    m, s the training split's pixel mean and std, which the model is not given), so

        u_c = (s x + m - mean_c) / std_c.

    On loading ImageNet weights, the first conv's input channel c is divided by std_c: the channel-dependent
    part of u_c, folded in exactly. What remains, a factor s shared by all channels and a constant
    sum_c W_c (m - mean_c) / std_c per output channel, is removed by the BatchNorm right after the bias-free
    first conv (resnet bn1, densenet norm0) as it trains on batch statistics: BN(a h + b) = BN(h) for a > 0.
    Not removed: the pixels within reach of the first conv's zero padding (0 there means p = m, not mean_c),
    BN's eps, and the ImageNet running statistics until fine-tuning has updated them. A local file is loaded
    as it is (x replicated), as its expected normalisation is unknown.
    """

    IMAGENET = "imagenet"

    def __init__(self, name, weights=None):
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None)
        if weights == self.IMAGENET:
            state, source, std = self.imagenet_state(name)
            self.load(net, name, state, source, std)
        elif weights:
            self.load(net, name, self.local_state(weights), str(weights))
        if name.startswith("resnet"):
            self.out_dim, net.fc = net.fc.in_features, nn.Identity()
        else:
            self.out_dim, net.classifier = net.classifier.in_features, nn.Identity()
        self.net = net

    @staticmethod
    def imagenet_state(name):
        """-> (torchvision's ImageNet state_dict for `name`, its file, ImageNet's per-channel std)."""
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        folder = Path(torch.hub.get_dir()) / "checkpoints"             # where torch.hub keeps downloads
        file_name = weights.url.rsplit("/", 1)[-1]
        try:
            state = weights.get_state_dict(progress=True, map_location="cpu", weights_only=True)
        except OSError as error:                                        # offline, proxy, HTTP error
            raise DataError(f"--backbone-weights imagenet: {file_name} is not in {folder} and cannot be "
                            f"downloaded ({error}); download {weights.url} on a machine with internet and put "
                            f"it into {folder} (TORCH_HOME moves that folder)") from error
        return state, str(folder / file_name), weights.transforms().std

    @staticmethod
    def local_state(path):
        if not Path(path).is_file():
            raise DataError(f"--backbone-weights {path}: no such file (give imagenet or a torchvision state_dict)")
        return torch.load(path, map_location="cpu", weights_only=True)

    @staticmethod
    def load(net, name, state, source, std=None):
        """Load a torchvision state_dict into `net`; with `std`, divide the first conv's input channel c by std[c]."""
        # torchvision's published densenet files use old key names ("norm.1" for "norm1")
        state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.(\d)", r"\1\2", k): v for k, v in state.items()}
        expected = net.state_dict()
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        shapes = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            raise DataError(f"{source} is not a torchvision {name} state_dict: {len(missing)} missing keys "
                            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, wrong shapes {shapes[:3]}")
        if std is not None:
            first = next(n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)) + ".weight"
            state[first] = state[first] / torch.tensor(std).view(1, 3, 1, 1)    # (C_out, 3, k, k)
        net.load_state_dict(state)

    def forward(self, x):
        return self.net(x.expand(-1, 3, -1, -1))                             # gray -> RGB, see the docstring


class TextEncoder(nn.Module):
    """Transformer over report tokens: (B, T) ids -> (B, text_dim), pooled over the non-padding tokens by
    attention (AttentionPooling) or by their mean (text_pooling="mean").

    Word dropout (cfg.word_dropout, training only): each token of a report is replaced by [UNK] with probability
    p, so that the teacher cannot lean on any one word; with 2,600 training reports (OpenI) it overfits otherwise.

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

    def forward(self, t):
        B, T = t.shape
        assert T <= self.position_embedding.num_embeddings, f"{T} tokens > max_len"
        padding = t == PAD                                                        # (B, T), True = ignore
        if self.training and self.word_dropout > 0:                              # word dropout, never on [PAD]
            dropped = (torch.rand(t.shape, device=t.device) < self.word_dropout) & (t > UNK)        # (B, T)
            t = t.masked_fill(dropped, UNK)
        positions = torch.arange(T, device=t.device)
        h = self.token_embedding(t) + self.position_embedding(positions)[None]  # (B, T, C)
        h = self.norm(self.encoder(h, src_key_padding_mask=padding))             # (B, T, C)
        if self.pool is not None:
            return self.pool(h, padding)                                         # (B, C)
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1)                      # mean: (B, C)


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


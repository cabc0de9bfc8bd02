"""Model: image and report encoders, Gaussian prior and posterior, classifier, the VKD objective.

Notation (van Sonsbeek et al., IPMI 2021): x image, t report text, y the 14 labels, z the latent.

    prior (student, test time)   p(z | x)    = N(mu_p(x),    diag exp(logvar_p(x)))
    posterior (teacher)          q(z | x, t) = N(mu_q(x, t), diag exp(logvar_q(x, t)))
    classifier                   p(y | z)    = Bernoulli(sigmoid(f(z)))

    ELBO:  log p(y | x) >= E_q(z|x,t)[log p(y | z)] - beta * KL(q(z|x,t) || p(z|x))      (eq. 1)

Five methods share this code: `vkd` (eq. 1 plus a BCE on prior samples), `image` (a BCE on
f(mu_p(x)) only: the baseline VKD must beat), `text` (a BCE on posterior samples only: an upper
bound that reads the report), and two other ways to use a report that exists only in training,
with the image path of `image`: `distill` (a `text` teacher's predictions as soft targets) and
`contrastive` (image features aligned with report features). The authors' code made other choices;
each is a switch of VKDConfig, off by default (its last four fields).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vkd.backbones import TorchvisionEncoder
from vkd.text_tuning import PAD, AttentionPooling, ReportTuning

METHODS = ("vkd", "image", "text", "distill", "contrastive")
# the loss parts each method logs, in the order of log.jsonl
LOSS_PARTS = {"vkd": ("loss", "bce_posterior", "bce_prior", "kl"),
              "distill": ("loss", "bce_prior", "distill"),
              "contrastive": ("loss", "bce_prior", "contrastive")}
LOSS_PARTS["image"] = LOSS_PARTS["text"] = LOSS_PARTS["vkd"]
# methods whose loss reads the prior mean mu_p(x) only: their logvar_p is never trained
PRIOR_MEAN_ONLY = ("image", "distill", "contrastive")


@dataclass
class VKDConfig:
    """Every model default. The report encoder's tuning (attention pooling, word dropout, the
    sentence options) is off here; OpenI turns it on (config/collections.py)."""
    num_labels: int = 14
    latent_dim: int = 64
    backbone: str = "cnn"           # cnn | resnet18 | densenet121
    cnn_width: int = 16             # channels of the compact CNN's stem
    vocab_size: int = 2000
    max_len: int = 64               # report tokens (data.load_for_run may set it from reports)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_pooling: str = "mean"      # mean | attention: how token features become one report feature
    dropout: float = 0.1
    word_dropout: float = 0.0       # training only: probability that a token becomes [UNK]
    sentence_shuffle: bool = False  # training only: a report's sentences in a random order
    sentence_attention: bool = False  # a token attends only to the tokens of its own sentence
    sentence_end: int = -1          # the token id that ends a sentence, "." (from the tokenizer)
    method: str = "vkd"
    # distill: alpha, the weight of the teacher's soft targets, and T, their temperature. 0.5: the
    # labels and the teacher count equally; 2 softens the teacher's near-certain probabilities
    # (Hinton et al. 2015 use 1-20) so that its ranking of the less likely labels shows.
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    # contrastive: gamma, the weight of the InfoNCE, and its temperature (ConVIRT's 0.1). 1: at
    # the start the BCE summed over 14 labels (14 ln 2 = 9.7) and the InfoNCE (ln B = 4.2 at a
    # batch of 64) are of one size.
    contrastive_weight: float = 1.0
    contrastive_temperature: float = 0.1
    projection_dim: int = 64            # the shared space of image and report features
    # the authors' choices, with train.py's flag for each (study.py measures them):
    posterior_reads_image: bool = True    # q(z | x, t); False: q(z | t)  (--posterior-input report)
    # f(z); True: f([z; h_x])       (--classifier-input z+image)
    classifier_reads_image: bool = False
    kl_direction: str = "qp"              # KL(q || p); "pq": KL(p || q)  (--kl-direction pq)
    average_samples: bool = False         # True: f(mean of L samples)    (--average-samples)


# ---------------------------------------------------------------------------------------- encoders

def conv_bn(c_in, c_out, stride):
    conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ResidualStage(nn.Module):
    """Downsample by 2 with a strided conv, then one residual 3x3 block."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.down = conv_bn(c_in, c_out, 2)
        self.block = nn.Sequential(conv_bn(c_out, c_out, 1),
                                   nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(c_out))

    def forward(self, h):
        h = self.down(h)
        return F.relu(h + self.block(h))


class ImageEncoder(nn.Module):
    """Compact CNN for 1-channel radiographs, a stem and three residual stages:
    (B, 1, H, W) -> (B, out_dim). Trains on a CPU at 128 px."""

    def __init__(self, width):
        super().__init__()
        w = width
        self.stem = conv_bn(1, w, 2)                                  # (B, w, H/2, W/2)
        self.stages = nn.Sequential(ResidualStage(w, 2 * w), ResidualStage(2 * w, 4 * w),
                                    ResidualStage(4 * w, 8 * w))      # (B, 8w, H/16, W/16)
        self.out_dim = 8 * w

    def forward(self, x):
        return self.stages(self.stem(x)).mean(dim=(2, 3))             # global average pool: (B, 8w)


class TextEncoder(nn.Module):
    """Transformer over report tokens: (B, T) ids -> (B, text_dim), the mean of the features of the
    non-padding tokens.

    Attention runs over the T tokens of each report (batch_first=True), never across the reports of
    a batch, and positional embeddings are indexed by token position. The authors' code erred in
    both: it fed batch-first tensors to a sequence-first attention (each token attended across the
    batch) and indexed its positional encoding by the position in the batch.

    OpenI's tuning sits behind two hooks (vkd/text_tuning.py): `tuning.augment` (sentences shuffled,
    words dropped, in training) and `tuning.attention_mask` (attention within each sentence); and
    text_pooling="attention" replaces the mean by AttentionPooling.
    """

    def __init__(self, cfg):
        super().__init__()
        assert cfg.text_pooling in ("attention", "mean"), f"text_pooling: {cfg.text_pooling!r}"
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_dim, padding_idx=PAD)
        self.position_embedding = nn.Embedding(cfg.max_len, cfg.text_dim)
        layer = nn.TransformerEncoderLayer(cfg.text_dim, cfg.text_heads, 4 * cfg.text_dim,
                                           cfg.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)
        attention = cfg.text_pooling == "attention"
        self.pool = AttentionPooling(cfg.text_dim, cfg.text_heads) if attention else None
        self.tuning = ReportTuning(cfg)

    def forward(self, t):
        B, T = t.shape
        assert T <= self.position_embedding.num_embeddings, f"{T} tokens > max_len"
        if self.training:
            t = self.tuning.augment(t)                                # (B, T); as is for the demo
        padding = t == PAD                                            # (B, T), True = ignore
        positions = torch.arange(T, device=t.device)
        h = self.token_embedding(t) + self.position_embedding(positions)[None]     # (B, T, C)
        mask = self.tuning.attention_mask(t)                          # None, or within sentences
        if mask is None:
            h = self.norm(self.encoder(h, src_key_padding_mask=padding))           # (B, T, C)
        else:
            h = self.norm(self.encoder(h, mask=mask))                 # the mask hides padding too
        if self.pool is not None:
            return self.pool(h, padding)                              # (B, C)
        keep = (~padding).unsqueeze(-1).to(h.dtype)                   # (B, T, 1)
        return (h * keep).sum(1) / keep.sum(1).clamp(min=1)           # mean: (B, C)


# --------------------------------------------------------------------------------- Gaussian latent

class GaussianHead(nn.Module):
    """features -> (mu, logvar) of a diagonal Gaussian; sigma = exp(0.5 logvar)."""

    def __init__(self, in_dim, latent_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True),
                                 nn.Linear(in_dim, 2 * latent_dim))

    def forward(self, h):
        mu, logvar = self.net(h).chunk(2, dim=-1)                     # (B, D) each
        # keeps exp() finite in low precision
        return mu, logvar.clamp(-10.0, 10.0)


def reparameterize(mu, logvar, num_samples=1):
    """z = mu + sigma * eps, eps ~ N(0, I), sigma = exp(0.5 * logvar): (S, B, D), differentiable in
    mu and logvar."""
    eps = torch.randn((num_samples, *mu.shape), device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(q || p) between diagonal Gaussians, summed over latent dims: (B, D) x 4 -> (B,).

    KL = 1/2 sum_d [ logvar_p - logvar_q + (exp(logvar_q) + (mu_q - mu_p)^2) / exp(logvar_p) - 1 ]
    """
    ratio = (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp()
    return 0.5 * (logvar_p - logvar_q + ratio - 1).sum(-1)


def bce(logits, y, pos_weight=None):
    """-log p(y | z) summed over labels, averaged over samples and batch; logits (S, B, K), (B, K).
    pos_weight (K,): the weight of a positive label's term (positive_weights), 1 by default. A NaN
    label is not observed (an uncertain label under --uncertain ignore): no loss, no gradient."""
    y = y.expand_as(logits).float()
    observed = ~torch.isnan(y)
    terms = F.binary_cross_entropy_with_logits(logits.float(), torch.where(observed, y, 0.0),
                                               reduction="none", pos_weight=pos_weight)
    return torch.where(observed, terms, 0.0).sum(-1).mean()


# --------------------------------------------------------------------------------------------- VKD

class VKD(nn.Module):
    def __init__(self, cfg, backbone_weights=None, pos_weight=None):
        super().__init__()
        assert cfg.method in METHODS, f"method must be one of {METHODS}, got {cfg.method!r}"
        assert cfg.kl_direction in ("qp", "pq"), f"kl_direction: qp or pq, not {cfg.kl_direction!r}"
        self.cfg = cfg
        if cfg.backbone == "cnn":
            self.image_encoder = ImageEncoder(cfg.cnn_width)
        else:
            self.image_encoder = TorchvisionEncoder(cfg.backbone, backbone_weights)
        image_dim = self.image_encoder.out_dim
        self.prior = GaussianHead(image_dim, cfg.latent_dim)                      # p(z | x)
        reads_report = cfg.method in ("vkd", "text")
        self.text_encoder = TextEncoder(cfg) if reads_report else None
        posterior_dim = cfg.text_dim + (image_dim if cfg.posterior_reads_image else 0)
        # q(z | x, t), or q(z | t)
        self.posterior = GaussianHead(posterior_dim, cfg.latent_dim) if reads_report else None
        classifier_dim = cfg.latent_dim + (image_dim if cfg.classifier_reads_image else 0)
        self.classifier = nn.Linear(classifier_dim, cfg.num_labels)         # f(z) or f([z; h_x])
        if cfg.method == "contrastive":   # built last: the image path starts as `image`'s does
            self.text_encoder = TextEncoder(cfg)
            self.image_projection = nn.Linear(image_dim, cfg.projection_dim)
            self.text_projection = nn.Linear(cfg.text_dim, cfg.projection_dim)
        # a training choice (positive_weights), not a weight of the model: not in the state_dict
        ones = torch.ones(cfg.num_labels)
        weight = ones if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight, persistent=False)

    def encode_prior(self, x):
        assert x.dim() == 4 and x.shape[1] == 1, f"x must be (B, 1, H, W), got {tuple(x.shape)}"
        h_x = self.image_encoder(x)                                    # (B, F)
        return h_x, *self.prior(h_x)

    def encode_posterior(self, h_x, t):
        h_t = self.text_encoder(t)                                     # (B, C)
        if not self.cfg.posterior_reads_image:
            return self.posterior(h_t)                                 # q(z | t)
        return self.posterior(torch.cat([h_x, h_t], dim=-1))           # q(z | x, t): concatenation

    def classify(self, z, h_x):
        """Logits f(z) of z (B, D) or of samples (S, B, D); f([z; h_x]) with
        cfg.classifier_reads_image."""
        if self.cfg.classifier_reads_image:
            z = torch.cat([z, h_x.expand(*z.shape[:-1], -1)], dim=-1)
        return self.classifier(z)

    def sample(self, mu, logvar, num_samples):
        """L samples z ~ N(mu, diag exp(logvar)): (L, B, D), or their mean (1, B, D) with
        cfg.average_samples. Averaging many samples (the authors use 100) shrinks the noise by
        sqrt(L): z becomes nearly mu."""
        z = reparameterize(mu, logvar, num_samples)
        return z.mean(0, keepdim=True) if self.cfg.average_samples else z

    def kl(self, mu_q, logvar_q, mu_p, logvar_p):
        """KL(q || p) averaged over the batch (eq. 1); KL(p || q) with cfg.kl_direction == "pq"."""
        q, p = (mu_q.float(), logvar_q.float()), (mu_p.float(), logvar_p.float())
        kl = gaussian_kl(*p, *q) if self.cfg.kl_direction == "pq" else gaussian_kl(*q, *p)
        return kl.mean()

    def forward(self, x, t, y, beta=1.0, prior_weight=1.0, num_samples=1):
        """Loss parts for one batch. x (B, 1, H, W) float, t (B, T) token ids (for distill: the
        teacher's logits s (B, K) on these images), y (B, K) in {0, 1} or NaN (not observed); beta a
        float or a 0-dim tensor.

        vkd:   loss = BCE(f(z_q)) + prior_weight * BCE(f(z_p)) + beta * KL(q || p),
               z_q ~ q(z|x,t), z_p ~ p(z|x). The first and last terms are the negative ELBO (eq. 1);
               the middle one trains the test-time prior path directly (in eq. 1 the classifier only
               ever sees posterior samples).
        image: loss = BCE(f(mu_p(x)))
        text:  loss = BCE(f(z_q)),  z_q ~ q(z|x,t)
        distill, contrastive: BCE(f(mu_p(x))) and a term of their own (distill_loss,
        contrastive_loss).
        Every BCE on the labels weighs a positive label's term by self.pos_weight (1 by default).
        """
        method = self.cfg.method
        h_x, mu_p, logvar_p = self.encode_prior(x)
        zero = torch.zeros((), device=x.device)
        if method in ("image", "distill", "contrastive"):         # the path that is tested
            logits = self.classify(mu_p, h_x)                         # f(mu_p(x)): (B, K)
            bce_prior = bce(logits, y, self.pos_weight)
        if method == "image":
            return {"loss": bce_prior, "bce_posterior": zero, "bce_prior": bce_prior, "kl": zero}
        if method == "distill":
            return self.distill_loss(logits, bce_prior, t)
        if method == "contrastive":
            return self.contrastive_loss(h_x, t, bce_prior)
        mu_q, logvar_q = self.encode_posterior(h_x, t)
        z_q = self.sample(mu_q, logvar_q, num_samples)                          # (L, B, D)
        bce_posterior = bce(self.classify(z_q, h_x), y, self.pos_weight)
        if method == "text":
            return {"loss": bce_posterior, "bce_posterior": bce_posterior, "bce_prior": zero,
                    "kl": zero}
        z_p = self.sample(mu_p, logvar_p, num_samples)                          # (L, B, D)
        bce_prior = bce(self.classify(z_p, h_x), y, self.pos_weight)
        kl = self.kl(mu_q, logvar_q, mu_p, logvar_p)
        loss = bce_posterior + prior_weight * bce_prior + beta * kl
        return {"loss": loss, "bce_posterior": bce_posterior, "bce_prior": bce_prior, "kl": kl}

    def distill_loss(self, logits, bce_prior, s):
        """Generalized distillation (Hinton et al. 2015; Lopez-Paz et al., ICLR 2016): the labels
        and the soft predictions of a `text` teacher that read the report, s = its logits:

            loss = (1 - alpha) BCE(f(mu_p(x)), y) + alpha T^2 BCE(sigmoid(f / T), sigmoid(s / T))

        T^2 keeps the soft term's gradients of the same size whatever T (Hinton et al.)."""
        alpha, T = self.cfg.distill_alpha, self.cfg.distill_temperature
        soft = bce(logits / T, torch.sigmoid(s.float() / T))        # soft targets in (0, 1)
        loss = (1 - alpha) * bce_prior + alpha * T ** 2 * soft
        return {"loss": loss, "bce_prior": bce_prior, "distill": soft}

    def contrastive_loss(self, h_x, t, bce_prior):
        """The BCE plus gamma times the symmetric InfoNCE between the batch's projected image and
        report features (ConVIRT, Zhang et al. 2022, in one stage): image i and report i are a
        pair, every other report of the batch a negative, and the same for each report:

            InfoNCE = 1/2 [CE(softmax_j(a_i . b_j / tau), i) + CE(softmax_j(b_i . a_j / tau), i)]

        Images of one report (the same tokens) are not negatives of each other. Under torchrun
        the negatives are those of each process's batch."""
        a = F.normalize(self.image_projection(h_x).float(), dim=-1)                 # (B, P)
        b = F.normalize(self.text_projection(self.text_encoder(t)).float(), dim=-1)  # (B, P)
        with torch.autocast(h_x.device.type, enabled=False):        # logits / tau in fp32
            similarity = a @ b.T / self.cfg.contrastive_temperature                 # (B, B)
        same_report = (t[:, None, :] == t[None, :, :]).all(-1)                      # (B, B)
        same_report &= ~torch.eye(len(t), dtype=torch.bool, device=t.device)
        similarity = similarity.masked_fill(same_report, float("-inf"))
        pair = torch.arange(len(t), device=t.device)
        nce = 0.5 * (F.cross_entropy(similarity, pair) + F.cross_entropy(similarity.T, pair))
        loss = bce_prior + self.cfg.contrastive_weight * nce
        return {"loss": loss, "bce_prior": bce_prior, "contrastive": nce}

    @torch.no_grad()
    def predict(self, x, num_samples=0):
        """Image-only inference from the prior p(z|x); the text encoder never runs here.

        num_samples=0: probabilities sigmoid(f(mu_p)), std is zero.
        num_samples=S: mean and std of sigmoid(f(z_s)) over S samples z_s ~ p(z|x) (the std is the
        image's uncertainty). Returns (probabilities (B, K), std (B, K)).
        """
        h_x, mu_p, logvar_p = self.encode_prior(x)
        if num_samples == 0:
            probabilities = torch.sigmoid(self.classify(mu_p, h_x).float())
            return probabilities, torch.zeros_like(probabilities)
        z = reparameterize(mu_p, logvar_p, num_samples)                          # (S, B, D)
        samples = torch.sigmoid(self.classify(z, h_x).float())                   # (S, B, K)
        return samples.mean(0), samples.std(0, correction=0)

    @torch.no_grad()
    def predict_with_text(self, x, t):
        """The `text` upper bound: sigmoid(f(mu_q(x, t))). It reads the report: not a test-time
        model."""
        h_x, _, _ = self.encode_prior(x)
        mu_q, _ = self.encode_posterior(h_x, t)
        return torch.sigmoid(self.classify(mu_q, h_x).float())

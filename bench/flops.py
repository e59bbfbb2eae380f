"""Analytic FLOPs of a CLIP training step, and model FLOPs utilisation (MFU).

Only matrix multiplications and convolutions are counted (2 FLOPs per multiply-add);
normalisation, activations, softmax, pooling, embeddings lookups and the optimiser are left
out, as in the usual MFU convention. Per pair (one image and one caption), forward:

- **ViT image tower** (image R, patch p, width W, layers l, MLP hidden H, T = (R/p)^2 + 1
  tokens): patch conv ``2 * 3p^2 * W * (R/p)^2`` + ``l * (2T * W * (4W + 2H) + 4 * T^2 * W)``
  (QKV 3W, output projection W and the two MLP matrices 2H per token; Q K^T and A V
  ``2 * T^2 * W`` each) + projection ``2 * W * D`` on the class token.
- **ResNet image tower**: ``2 * C_in * C_out * k^2 * H_out * W_out`` for every convolution
  (stem, bottlenecks, downsample shortcuts) + the attention pool over T = (R/32)^2 + 1 tokens
  of width C = 32w: ``2C^2`` (query, mean token only) + ``2 * 2T * C^2`` (keys, values) +
  ``2 * 2T * C`` (scores, weighted sum) + ``2 * C * D`` (output projection).
- **Text tower** (context L, width W, layers l): ``l * (2L * W * (4W + 2H) + 4 * L^2 * W)``
  + projection ``2 * W * D`` at the EOS token. Causal attention is counted as full L x L
  (the kernels compute whole tiles; FlopCounterMode counts it the same way).

Training FLOPs per pair = 3 x forward (backward = 2 x forward: gradients of inputs and of
weights). The contrastive logits (``2 * 2 * N * D`` per pair and direction pair for a global
batch N) belong to the loss, not the model, and are left out.

MFU = pairs/s x training FLOPs per pair / peak dense FLOP/s of the device (bf16 tensor-core
peak without sparsity: 989 TFLOP/s for H100 SXM and H200).
"""

from __future__ import annotations

from clip_core.config import ModelConfig, ResNetConfig, TextConfig, ViTConfig

# Dense bf16 tensor-core peaks (no 2:4 sparsity), FLOP/s, matched against the device name.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100": 989e12,  # H100 SXM5; the PCIe card is 756e12 (named "H100 PCIe")
    "H200": 989e12,
}
PEAK_OVERRIDES: dict[str, float] = {"H100 PCIE": 756e12}
TRAIN_FORWARD_MULTIPLE = 3  # forward + backward (2x forward)


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """Forward FLOPs of ``layers`` pre-LN blocks on one sequence of ``tokens``."""
    hidden = int(width * mlp_ratio)
    dense = 2 * tokens * width * (4 * width + 2 * hidden)  # QKV, out proj, MLP in + out
    attention = 4 * tokens * tokens * width  # Q K^T and A V over all heads
    return layers * (dense + attention)


def vit_flops(cfg: ViTConfig, embed_dim: int) -> int:
    """Forward FLOPs of the ViT image tower for one image."""
    grid = cfg.image_size // cfg.patch_size
    patch = 2 * 3 * cfg.patch_size**2 * cfg.width * grid * grid
    blocks = transformer_flops(grid * grid + 1, cfg.width, cfg.layers, cfg.mlp_ratio)
    return patch + blocks + 2 * cfg.width * embed_dim


def _conv(c_in: int, c_out: int, kernel: int, size: int) -> int:
    """One convolution producing ``size x size`` outputs."""
    return 2 * c_in * c_out * kernel * kernel * size * size


def resnet_flops(cfg: ResNetConfig, embed_dim: int) -> int:
    """Forward FLOPs of CLIP's modified ResNet for one image (see ``clip_core.resnet``)."""
    w, size = cfg.width, cfg.image_size // 2  # the stem's first conv has stride 2
    total = _conv(3, w // 2, 3, size) + _conv(w // 2, w // 2, 3, size) + _conv(w // 2, w, 3, size)
    size //= 2  # stem average pool
    inplanes = w
    for stage, blocks in enumerate(cfg.layers):
        planes = w * 2**stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            out = planes * 4
            total += _conv(inplanes, planes, 1, size) + _conv(planes, planes, 3, size)
            total += _conv(planes, out, 1, size // stride)  # after the anti-aliasing pool
            if stride > 1 or inplanes != out:
                total += _conv(inplanes, out, 1, size // stride)  # pooled shortcut
            size //= stride
            inplanes = out
    c, tokens = 32 * w, (cfg.image_size // 32) ** 2 + 1
    pool = 2 * c * c + 2 * 2 * tokens * c * c + 2 * 2 * tokens * c + 2 * c * embed_dim
    return total + pool


def text_flops(cfg: TextConfig, embed_dim: int) -> int:
    """Forward FLOPs of the text tower for one caption padded to the context length."""
    blocks = transformer_flops(cfg.context_length, cfg.width, cfg.layers, cfg.mlp_ratio)
    return blocks + 2 * cfg.width * embed_dim


def forward_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs of one image-caption pair through both towers."""
    vision = cfg.vision
    if isinstance(vision, ViTConfig):
        image = vit_flops(vision, cfg.embed_dim)
    else:
        image = resnet_flops(vision, cfg.embed_dim)
    return image + text_flops(cfg.text, cfg.embed_dim)


def train_flops_per_pair(cfg: ModelConfig) -> int:
    """Training FLOPs per pair: 3 x forward."""
    return TRAIN_FORWARD_MULTIPLE * forward_flops(cfg)


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a device name (``torch.cuda.get_device_name``), or None."""
    upper = device_name.upper()
    for key, value in PEAK_OVERRIDES.items():
        if key in upper:
            return value
    for key, value in PEAK_BF16_FLOPS.items():
        if key in upper:
            return value
    return None


def mfu(pairs_per_s: float, flops_per_pair: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak."""
    return pairs_per_s * flops_per_pair / peak

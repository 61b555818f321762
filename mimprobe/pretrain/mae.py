"""Masked autoencoder (MAE) around a timm ViT: random masking, a light decoder and the masked-patch pixel loss.

He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377; names and details follow the
official implementation (facebookresearch/mae, ``models_mae.py``) so that `MaskedAutoencoder.mae_state_dict`
is an official "full" pre-training checkpoint: encoder keys in timm names, plus ``mask_token`` and ``decoder_*``.

Pure compute: no files, no data loading (see `mimprobe.pretrain.train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

StateDict = dict[str, torch.Tensor]
ENCODER_PREFIX = "encoder."
NORM_PIX_EPS = 1e-6  # official MAE: (var + 1e-6) ** 0.5


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images to flattened patches, in the official MAE order (row-major patches, pixels as (p, q, channel)).

    Args:
        images: (B, C, H, W), H and W divisible by ``patch_size``.

    Returns:
        (B, h·w, p²·C) with h = H / p, w = W / p.
    """
    batch, channels, height, width = images.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
    h, w = height // p, width // p
    x = images.reshape(batch, channels, h, p, w, p)  # (batch, channel, grid row, p, grid col, q)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, h * w, p * p * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`.

    Args:
        patches: (B, h·w, p²·C).
        grid_size: (h, w) patches per column and per row.

    Returns:
        (B, C, h·p, w·p).
    """
    batch = patches.shape[0]
    h, w = grid_size
    p = patch_size
    x = patches.reshape(batch, h, w, p, p, channels)  # (batch, grid row, grid col, p, q, channel)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(batch, channels, h * p, w * p)


def sincos_pos_embed(grid_size: tuple[int, int], dim: int, *, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding in the official MAE layout (``util/pos_embed.py``).

    Token t = i·w + j (row i, column j) gets ``[sin(j·ω), cos(j·ω), sin(i·ω), cos(i·ω)]`` with
    ω_k = 10000^(-k / (dim/4)), k < dim/4. Built with timm's ``build_sincos2d_pos_embed`` (which orders the
    same values as sin(i), sin(j), cos(i), cos(j)) and re-ordered.

    Args:
        grid_size: (h, w) patch grid.
        dim: Embedding width, divisible by 4.
        cls_token: Prepend the all-zero row of the class token, as the official files store it.

    Returns:
        (1, [1 +] h·w, dim) float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4 (got {dim})")
    h, w = grid_size
    timm_layout = build_sincos2d_pos_embed([h, w], dim)  # (h·w, dim): sin(i), sin(j), cos(i), cos(j)
    x = timm_layout.view(h * w, 2, 2, dim // 4)  # (tokens, sin|cos, row i|column j, frequency)
    x = x.flip(2).transpose(1, 2)  # (tokens, column j|row i, sin|cos, frequency)
    embed = x.reshape(h * w, dim)
    if cls_token:
        embed = torch.cat([torch.zeros(1, dim), embed], dim=0)
    return embed.unsqueeze(0)


@dataclass(frozen=True)
class Masking:
    """Per-sample random masking (official ``random_masking``: argsort of uniform noise).

    Attributes:
        ids_keep: (B, K) indices of the visible patches, in shuffled order.
        ids_restore: (B, N) permutation that puts [visible, masked] tokens back in image order.
        mask: (B, N) float, 0 visible, 1 masked, in image order.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches kept per sample: round(N·(1 - ratio)); the official ``int()`` can floor 0.9999… to 0."""
    return int(round(num_patches * (1.0 - mask_ratio)))


def random_masking(batch_size: int, num_patches: int, mask_ratio: float, *, device: torch.device | str = "cpu",
                   generator: torch.Generator | None = None) -> Masking:
    """Draw an independent random mask for every sample.

    Raises:
        ValueError: The ratio keeps no patch or masks none.
    """
    keep = num_visible(num_patches, mask_ratio)
    if not 0 < keep < num_patches:
        raise ValueError(f"mask ratio {mask_ratio} keeps {keep} of {num_patches} patches: it must keep at least "
                         "one patch and mask at least one")
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return Masking(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                      norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error on the masked patches (MAE, arXiv 2111.06377, Sec. 3: "we compute the loss only on
    masked patches"; with ``norm_pix`` the target is each patch's pixels normalised by their own mean and
    standard deviation, the paper's "normalized pixels" variant).

    Args:
        pred: (B, N, P) predicted patches.
        target: (B, N, P) patchified input images.
        mask: (B, N), 1 for masked patches.

    Returns:
        Scalar float32: per-patch mean over P, averaged over the masked patches of the batch.
    """
    pred, target, mask = pred.float(), target.float(), mask.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in the official code
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


@dataclass(frozen=True)
class MaeOutput:
    """One MAE forward: the loss, the predictions (B, N, p²·3) and the mask (B, N) (1 = masked)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder that sees only the visible patches, and a light decoder that predicts the pixels of
    the masked ones (official ``MaskedAutoencoderViT``).

    With ``decoder_depth=0`` it is SimMIM's design instead (Xie et al., arXiv 2111.09886, Sec. 3 and the official
    ``models/simmim.py``): the encoder sees every patch, the hidden ones replaced by a learned mask token, and a
    linear prediction head (each encoder output token to its patch's pixels: SimMIM's 1x1 convolution and pixel
    shuffle) leaves the whole reconstruction to the encoder's last blocks, the setting in which MIM-Refiner (arXiv
    2402.10093, Sec. 3) finds them least abstract. The loss stays MAE's (MSE on the hidden patches,
    ``norm_pix_loss``), so that the two designs differ only in their architecture; SimMIM itself uses L1 on raw
    pixels.

    The encoder keeps its own parts (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``, ``norm``); its
    ``pos_embed`` becomes the fixed 2-D sin-cos table with a zero class-token row and is frozen, as in MAE.

    Args:
        encoder: A timm ``VisionTransformer`` with one class token, position embeddings that include the class
            token's row, and square patches; images must have the size it was built for (also with
            ``dynamic_img_size``). It is used (and trained) in place.
        decoder_dim: Decoder width (official base/large: 512).
        decoder_depth: Decoder blocks (official: 8); 0: SimMIM's linear head on an encoder that sees mask tokens
            (``decoder_dim`` and ``decoder_heads`` are then unused).
        decoder_heads: Decoder attention heads (official: 16).
        mlp_ratio: Decoder MLP ratio.
        norm_pix_loss: Normalise every target patch by its own mean and standard deviation.

    Raises:
        ValueError: An encoder this recipe cannot drive, or inconsistent decoder sizes.
    """

    def __init__(self, encoder: nn.Module, *, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = True):
        super().__init__()
        _check_encoder(encoder)
        if decoder_depth < 0:
            raise ValueError(f"decoder depth must be at least 0 (got {decoder_depth})")
        if decoder_depth and (decoder_dim < 4 or decoder_dim % 4 or decoder_dim % decoder_heads):
            raise ValueError(f"decoder width {decoder_dim} must be divisible by 4 and by the number of heads "
                             f"({decoder_heads})")
        self.encoder = encoder
        self.norm_pix_loss = norm_pix_loss
        self.linear_head = decoder_depth == 0  # SimMIM: mask tokens in the encoder, one linear layer after it
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        self.grid_size = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        embed_dim = int(encoder.embed_dim)
        with torch.no_grad():
            encoder.pos_embed.copy_(sincos_pos_embed(self.grid_size, embed_dim))
        encoder.pos_embed.requires_grad_(False)
        if self.linear_head:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # (1, 1, D): replaces a hidden patch
            self.decoder_pred = nn.Linear(embed_dim, self.patch_size ** 2 * 3)
            self._init_decoder()
            return

        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(self.grid_size, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth))
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """Official initialisation of the decoder: xavier-uniform linears, unit LayerNorms, N(0, 0.02) mask token."""
        nn.init.normal_(self.mask_token, std=0.02)
        decoder = [self.decoder_pred] if self.linear_head else [self.decoder_embed, *self.decoder_blocks.modules(),
                                                                 self.decoder_norm, self.decoder_pred]
        for module in decoder:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_encoder(self, images: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Encode the visible patches (with the linear head: every patch, the hidden ones as the mask token).

        Args:
            images: (B, 3, H, W) normalised images.
            masking: Which patches are visible.

        Returns:
            (B, 1 + K, D): the class token and the K visible patch tokens, after the final norm; with the linear
            head (B, 1 + N, D), every patch in image order.
        """
        enc = self.encoder
        expected = (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)
        if tuple(images.shape[-2:]) != expected:
            raise ValueError(f"images of {tuple(images.shape[-2:])} px, but the encoder was built for {expected}")
        x = enc.patch_embed(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, D): timm's patch embedding may return (B, h, w, D)
        if self.linear_head:  # official SimMIM: x * (1 - w) + mask_token * w, before the position embedding
            hidden = masking.mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            x = x * (1 - hidden) + self.mask_token.to(x.dtype) * hidden
        x = x + enc.pos_embed[:, 1:, :]
        if not self.linear_head:
            x = torch.gather(x, dim=1, index=masking.ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = enc.norm_pre(torch.cat([cls, x], dim=1))
        for block in enc.blocks:
            x = block(x)
        return enc.norm(x)

    def forward_decoder(self, latent: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Predict every patch's pixels from the visible tokens and mask tokens.

        Args:
            latent: (B, 1 + K, D) encoder output; with the linear head (B, 1 + N, D).
            masking: The mask used by the encoder.

        Returns:
            (B, N, p²·3) predictions in image order (class token dropped).
        """
        if self.linear_head:
            return self.decoder_pred(latent[:, 1:, :])
        x = self.decoder_embed(latent)  # (B, 1 + K, Dd)
        batch, _, width = x.shape
        mask_tokens = self.mask_token.expand(batch, self.num_patches - (x.shape[1] - 1), -1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, N, Dd), shuffled order
        patches = torch.gather(patches, dim=1, index=masking.ids_restore.unsqueeze(-1).expand(-1, -1, width))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, images: torch.Tensor, *, mask_ratio: float = 0.75,
                generator: torch.Generator | None = None, masking: Masking | None = None) -> MaeOutput:
        """Mask, encode, decode and score one batch.

        Args:
            images: (B, 3, H, W) normalised images.
            mask_ratio: Fraction of patches hidden from the encoder (ignored when ``masking`` is given).
            generator: Random generator of the mask (on the images' device).
            masking: A fixed mask to use instead of drawing one.
        """
        if masking is None:
            masking = random_masking(images.shape[0], self.num_patches, mask_ratio, device=images.device,
                                     generator=generator)
        pred = self.forward_decoder(self.forward_encoder(images, masking), masking)
        loss = masked_patch_loss(pred, patchify(images, self.patch_size), masking.mask, norm_pix=self.norm_pix_loss)
        return MaeOutput(loss=loss, pred=pred, mask=masking.mask)

    def no_weight_decay_names(self) -> set[str]:
        """Parameters kept out of weight decay besides norms and biases: the tokens and position tables (timm's
        ``VisionTransformer.no_weight_decay``; the official MAE script decays cls/mask tokens, a detail we drop)."""
        return {ENCODER_PREFIX + "cls_token", ENCODER_PREFIX + "pos_embed", "mask_token", "decoder_pos_embed"}

    def mae_state_dict(self) -> StateDict:
        """The official MAE "full" checkpoint layout: encoder keys in timm names (``cls_token``, ``pos_embed``
        (1, 1+N, D) with its zero class-token row, ``patch_embed.proj.*``, ``blocks.{i}.*``, ``norm.*``), then
        ``mask_token`` and ``decoder_*``. Tensors are detached CPU copies."""
        out: StateDict = {}
        for key, value in self.state_dict().items():
            name = key[len(ENCODER_PREFIX):] if key.startswith(ENCODER_PREFIX) else key
            out[name] = value.detach().cpu().clone()
        return out

    def load_mae_state_dict(self, state_dict: StateDict) -> None:
        """Load a `mae_state_dict` layout strictly (missing or unexpected keys raise)."""
        decoder_keys = {key for key in self.state_dict() if not key.startswith(ENCODER_PREFIX)}
        internal = {(key if key in decoder_keys else ENCODER_PREFIX + key): value for key, value in state_dict.items()}
        self.load_state_dict(internal, strict=True)


def _check_encoder(encoder: nn.Module) -> None:
    required = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "norm_pre")
    missing = [name for name in required if getattr(encoder, name, None) is None]
    if missing:
        raise ValueError(f"MAE needs a ViT with {', '.join(required)}; this model lacks {', '.join(missing)}")
    patch_embed = encoder.patch_embed
    grid = tuple(getattr(patch_embed, "grid_size", None) or ())
    patch = tuple(getattr(patch_embed, "patch_size", None) or ())
    if len(grid) != 2 or len(patch) != 2 or patch[0] != patch[1]:
        raise ValueError("MAE needs a ViT with a fixed patch grid and square patches")
    if getattr(encoder, "num_prefix_tokens", 1) != 1 or getattr(encoder, "no_embed_class", False):
        raise ValueError("MAE needs a ViT with exactly one class token (no registers) whose position embeddings "
                         "include the class token's row")
    if tuple(encoder.pos_embed.shape[1:]) != (1 + grid[0] * grid[1], int(encoder.embed_dim)):
        raise ValueError(f"position embeddings {tuple(encoder.pos_embed.shape)} do not fit the patch grid {grid}")

"""The evaluation preprocessing each checkpoint family was evaluated with, and where that is written.

A checkpoint file knows nothing of the timm name it is loaded into, whose ``pretrained_cfg`` (mean/std 0.5 and
crop 0.9 for ``vit_base_patch16_224``, say) describes timm's own weights, not the file's. Every family below was
trained and evaluated with ImageNet mean/std and a bicubic resize-then-centre-crop; the entries name the source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
RESIZE_256_CROP_224 = 224 / 256  # Resize(256) then CenterCrop(224) as a timm crop_pct


@dataclass(frozen=True)
class EvalPreprocessing:
    """Normalisation and resize/crop of a checkpoint family's evaluation.

    Attributes:
        mean, std: Per-channel normalisation (RGB, images in [0, 1]).
        interpolation: Resize interpolation (timm name).
        crop_pct: Centre-crop fraction: the image is resized to ``input / crop_pct``, then cropped to ``input``.
        crop_pct_above_224: ``crop_pct`` for inputs larger than 224 px, where the family's code differs.
        source: Where this comes from (repository and file), shown by ``mimprobe info`` and kept in manifests.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    source: str
    crop_pct_above_224: float | None = None

    def crop_pct_for(self, input_size: int) -> float:
        if self.crop_pct_above_224 is not None and input_size > 224:
            return self.crop_pct_above_224
        return self.crop_pct

    def as_dict(self) -> dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(self).items()}


def _imagenet(source: str, **kwargs: Any) -> EvalPreprocessing:
    return EvalPreprocessing(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, interpolation="bicubic",
                             crop_pct=RESIZE_256_CROP_224, source=source, **kwargs)


FORMAT_PREPROCESSING: dict[str, EvalPreprocessing] = {
    "mae": _imagenet("MAE evaluation (facebookresearch/mae main_linprobe.py: Resize(256, bicubic), "
                     "CenterCrop(224), ImageNet mean/std)"),
    "data2vec2": _imagenet("data2vec 2.0 evaluation (fairseq examples/data2vec/data/mae_finetuning_image_dataset.py "
                           "build_transform: bicubic resize to input/crop_pct, crop_pct 224/256 up to 224 px and 1.0 "
                           "above, ImageNet mean/std)", crop_pct_above_224=1.0),
    "mim-refiner": _imagenet("MIM-Refiner evaluation (ml-jku/MIM-Refiner eval_knn_torchhub.py: Resize(256, bicubic), "
                             "CenterCrop(224), ImageNet mean/std)"),
    "dino": _imagenet("DINO evaluation (facebookresearch/dino eval_knn.py and eval_linear.py: Resize(256, "
                      "bicubic), CenterCrop(224), ImageNet mean/std)"),
    "dinov2": _imagenet("DINOv2 evaluation (facebookresearch/dinov2 dinov2/data/transforms.py "
                        "make_classification_eval_transform: Resize(256, bicubic), CenterCrop(224), ImageNet "
                        "mean/std)"),
    # I-JEPA's repository has no evaluation transform: its normalisation (src/transforms.py make_transforms) and
    # the resize/crop with which MIM-Refiner evaluates it
    "fcmae": _imagenet("ConvNeXt V2 evaluation (facebookresearch/ConvNeXt-V2 datasets.py build_transform: bicubic "
                       "resize to input/crop_pct, crop_pct 224/256, centre crop, ImageNet mean/std; it warps without "
                       "cropping at 384 px and above)"),
    "simmim": _imagenet("SimMIM evaluation (microsoft/SimMIM data/data_finetune.py build_transform with TEST.CROP: "
                        "Resize(256/224 x input, bicubic), CenterCrop(input), ImageNet mean/std)"),
    "ijepa": _imagenet("I-JEPA (facebookresearch/ijepa src/transforms.py: ImageNet mean/std; the repository has no "
                       "evaluation transform, so Resize(256, bicubic), CenterCrop(224) as MIM-Refiner evaluates it)"),
}


def format_preprocessing(checkpoint_format: str | None) -> EvalPreprocessing | None:
    """The evaluation preprocessing of a detected checkpoint format, or None (use the timm model's own config)."""
    return FORMAT_PREPROCESSING.get(checkpoint_format or "")


def recorded_preprocessing(data_config: Any, source: str) -> EvalPreprocessing | None:
    """Preprocessing recorded in a checkpoint (mimprobe's own exports write the data config they trained with)."""
    if not isinstance(data_config, dict) or not {"mean", "std"} <= data_config.keys():
        return None
    try:
        return EvalPreprocessing(mean=tuple(float(v) for v in data_config["mean"]),
                                 std=tuple(float(v) for v in data_config["std"]),
                                 interpolation=str(data_config.get("interpolation", "bicubic")),
                                 crop_pct=float(data_config.get("crop_pct", RESIZE_256_CROP_224)), source=source)
    except (TypeError, ValueError):
        return None

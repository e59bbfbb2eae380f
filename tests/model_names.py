"""Model-name lists shared by the test modules."""

PAPER_MODELS = [
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B-32",
    "ViT-B-16",
    "ViT-L-14",
    "ViT-L-14-336",
]
TINY_MODELS = ["tiny-vit", "tiny-rn"]

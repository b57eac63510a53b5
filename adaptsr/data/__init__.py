"""Training data: synthetic real-world degradations, image files and datasets."""

from adaptsr.data.blur_kernels import (
    KERNEL_TYPES,
    anisotropic_gaussian_kernel,
    generalized_gaussian_kernel,
    isotropic_gaussian_kernel,
    plateau_kernel,
    sinc_kernel,
)
from adaptsr.data.datasets import CachedValidationSet, HRFolderDataset, PairedFolderDataset
from adaptsr.data.degradation_files import (
    degradation_from_dict,
    degradation_to_dict,
    load_degradation,
    mixture_of,
    save_degradation,
)
from adaptsr.data.degradations import (
    DEGRADATION_PRESETS,
    DegradationConfig,
    DegradationMixture,
    Degrader,
    StageConfig,
    add_gaussian_noise,
    add_poisson_noise,
    blur,
    camera_profile,
    degrade,
    get_preset,
    jpeg_compress,
    min_input_size,
)
from adaptsr.data.images import list_images, read_image, write_png

__all__ = [
    "DEGRADATION_PRESETS",
    "KERNEL_TYPES",
    "CachedValidationSet",
    "DegradationConfig",
    "DegradationMixture",
    "Degrader",
    "HRFolderDataset",
    "PairedFolderDataset",
    "StageConfig",
    "add_gaussian_noise",
    "add_poisson_noise",
    "anisotropic_gaussian_kernel",
    "blur",
    "camera_profile",
    "degradation_from_dict",
    "degradation_to_dict",
    "degrade",
    "generalized_gaussian_kernel",
    "get_preset",
    "isotropic_gaussian_kernel",
    "jpeg_compress",
    "list_images",
    "load_degradation",
    "min_input_size",
    "mixture_of",
    "plateau_kernel",
    "read_image",
    "save_degradation",
    "sinc_kernel",
    "write_png",
]

"""MONAI bundles (re-exports): import one as a model card (``generators.bundle_import``),
load it as a generator (``generators.bundle_runtime``), export a generator as a bundle that
MONAI's runner executes and model-zoo's checks accept (``generators.bundle_export``)."""

from __future__ import annotations

from generators.bundle_export import (
    LOGGING_CONF,
    bundle_metadata,
    export_bundle,
    export_diffusion_bundle,
    inference_config,
)
from generators.bundle_import import (
    import_bundle,
    install_bundle,
    licence_of,
    network_from_config,
)
from generators.bundle_runtime import (
    CODE_WARNING,
    DIFFUSION_ARCHITECTURES,
    KNOWN_NETWORKS,
    BundleGenerator,
    BundleNetwork,
    load_bundle_generator,
)

__all__ = [
    "CODE_WARNING",
    "DIFFUSION_ARCHITECTURES",
    "KNOWN_NETWORKS",
    "LOGGING_CONF",
    "BundleGenerator",
    "BundleNetwork",
    "bundle_metadata",
    "export_bundle",
    "export_diffusion_bundle",
    "import_bundle",
    "inference_config",
    "install_bundle",
    "licence_of",
    "load_bundle_generator",
    "network_from_config",
]

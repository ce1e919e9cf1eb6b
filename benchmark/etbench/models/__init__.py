"""Where weights come from: ``registry`` (aliases, resolution, availability; no torch), ``gguf``
(dequantise once, cache), ``load`` (a reference -> model + tokenizer), ``export`` (a reference -> a plain
transformers directory), ``toy`` (random test models)."""

from etbench.models.export import EXPORT_WRITER, check_export_dir, export_model
from etbench.models.gguf import GGUF_MANIFEST, cache_root, dequantised_dir, ensure_dequantised, find_dequantised
from etbench.models.load import (
    DTYPES,
    LoadedModel,
    MemoryEstimate,
    as_loaded,
    check_device,
    check_device_name,
    check_dtype,
    config_shape,
    default_dtype,
    ensure_built,
    estimate_memory,
    load,
    materialise_sources,
    shares_base,
    weights_sha256,
)
from etbench.models.registry import (
    ASSET_PREFIX,
    BUILT_MANIFEST,
    REGISTRY_PATH,
    SOURCE_KINDS,
    Availability,
    ModelRow,
    ModelSpec,
    RegistryEntry,
    availability,
    built_dir,
    cached_snapshot,
    find_built,
    format_model_table,
    hf_cache_dir,
    hub_offline,
    hub_reachable,
    list_models,
    parse_registry,
    published_ref,
    published_source,
    read_config,
    registry,
    resolve,
    spec_revision,
    weights_revision,
)

__all__ = [
    "EXPORT_WRITER", "check_export_dir", "export_model",
    "ASSET_PREFIX", "DTYPES", "MemoryEstimate", "default_dtype", "estimate_memory", "shares_base", "GGUF_MANIFEST",
    "REGISTRY_PATH", "SOURCE_KINDS", "Availability", "LoadedModel", "check_device", "check_device_name", "check_dtype", "config_shape",
    "ModelRow", "ModelSpec", "RegistryEntry", "as_loaded", "availability", "cache_root", "cached_snapshot",
    "dequantised_dir", "ensure_dequantised", "find_dequantised", "format_model_table", "hf_cache_dir",
    "hub_offline", "hub_reachable", "list_models", "load", "parse_registry", "published_ref", "published_source", "read_config", "registry", "resolve",
    "spec_revision", "weights_revision", "materialise_sources", "ensure_built", "weights_sha256", "built_dir", "find_built", "BUILT_MANIFEST",
]

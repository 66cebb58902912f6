"""Architecture specs: which tensor is what and which space each axis belongs to."""

from .spec import ArchSpec, TensorSpec, get_path, set_path, spec_for, supported_architectures

__all__ = ["ArchSpec", "TensorSpec", "get_path", "set_path", "spec_for", "supported_architectures"]

"""torch -> ONNX export of the three networks and the bundle writer."""

from vaegan.export.bundle_writer import build_manifest, write_bundle
from vaegan.export.onnx_export import ExportError, export_graphs

__all__ = ["ExportError", "build_manifest", "export_graphs", "write_bundle"]

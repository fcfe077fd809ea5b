"""`medfed export`: a finished run's model as a MONAI bundle or a TorchScript file."""

from medfed.client.export.run import ExportOptions, export_run

__all__ = ["ExportOptions", "export_run"]

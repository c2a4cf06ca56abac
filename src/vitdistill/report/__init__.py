"""What a distillation run kept and saved: model cost profiles, result tables, run reports."""
from vitdistill.report.profile import format_count, profile_model
from vitdistill.report.run_report import write_run_report
from vitdistill.report.tables import format_value, markdown_table, text_table

__all__ = [
    "format_count",
    "format_value",
    "markdown_table",
    "profile_model",
    "text_table",
    "write_run_report",
]

"""The privacy audit report: JSON for machines, a self-contained HTML page for privacy officers."""

from privacy.audit.report import SCHEMA, build_report, write_report

__all__ = ["SCHEMA", "build_report", "write_report"]

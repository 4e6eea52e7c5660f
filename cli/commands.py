"""Subcommand registry: each module here adds its commands to ``arcflow.cli.app.app`` on import."""

from . import dataset_commands, distill_commands, evaluate_commands, teacher_commands  # noqa: F401

"""Subcommand registry: each module here adds its commands to ``arcflow.cli.app.app`` on import."""

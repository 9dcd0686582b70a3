"""Subcommands of the `breadcrumbs-jax` command line (see breadcrumbs_jax.cli)."""

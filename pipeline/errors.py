"""The one base of every error a user can cause (bad config, data, source model, registry state).

Jobs print such an error as one line (``error: <message>``) and exit 2; anything else is a bug,
printed as one line with the path of the full log. Subclasses live with their concern:
``pipeline.config.ConfigError``, ``pipeline.data.DataError``, ``pipeline.finetune.FinetuneError``,
``pipeline.registry.RegistryError``. Messages name config fields and values, never a job's
command-line flags (the same code runs behind several jobs).
"""


class PipelineError(Exception):
    """A user-facing error whose message is meant to be read as-is, on one line."""

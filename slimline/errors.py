"""The small error hierarchy every part of slimline raises."""


class SlimlineError(Exception):
    """Base of every error slimline raises on purpose."""


class ConfigError(SlimlineError):
    """A pipeline file, a parameter or a data source is wrong; raised before any work starts."""


class PreflightError(SlimlineError):
    """Something a stage needs (a package, a device, disk space) is missing."""


class StageError(SlimlineError):
    """A stage failed while running."""


class ArtifactError(SlimlineError):
    """An artifact folder is missing, incomplete or does not match its manifest."""


class ReportError(SlimlineError):
    """A run folder is missing, or lacks what a report, a comparison or the gate needs."""

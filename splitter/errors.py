"""Domain errors of the splitter; each message says what to do."""


class ModelFormatError(ValueError):
    """A checkpoint is not of a family comfy-mesh knows, or is inconsistent."""


class PlanError(ValueError):
    """A plan or block range is invalid for the model it names."""

"""dreambooth: personalize text-to-image diffusion models from a few photos (Ruiz et al., 2023).

The Python API: `dreambooth.config.parse_train_config` and `dreambooth.train.train` (training),
`dreambooth.generate.generate` (images), `dreambooth.formats.export.export_model` (files for
other tools), `dreambooth.serve.app.run_server` (HTTP). Importing this package loads none of
them (and nothing of serve/ or world/).
"""

import logging


def _not_torchvision_notice(record: logging.LogRecord) -> bool:
    # transformers announces, on every import, that its image processors fall back to PIL
    # without torchvision; this tool never uses them, so the notice is not the user's business.
    return "requires torchvision" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_notice)

__version__ = "0.1.0"

"""Silence third-party log lines that say nothing to a diffuseg user.

* transformers 5 warns, on every import of a diffusers Stable Diffusion pipeline, that
  ``CLIPImageProcessor`` / ``SiglipImageProcessor`` fall back to their PIL versions because
  torchvision is missing. diffuseg depends on neither torchvision nor those processors (the
  safety checker's feature extractor is dropped), so the fallback is what it wants.
* diffusers warns "There are modules in X that should be kept in float32: []" whenever a
  model is moved with a dtype, also when the list is empty (nothing to keep): the Space moved
  six models and printed it six times.

Only these exact messages are dropped, through :class:`logging.Filter` on the loggers that
emit them; every other warning of those libraries still shows.
"""

from __future__ import annotations

import logging

_FILTERS: dict[str, tuple[str, ...]] = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
    "diffusers.models.modeling_utils": ("that should be kept in float32: [].",),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party() -> None:
    """Install the filters (idempotent; the loggers need not exist yet, nothing is imported)."""
    for name, fragments in _FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))

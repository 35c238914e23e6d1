"""Logging, configured once at the entry point."""

import logging


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "sentence_transformers", "pymilvus"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

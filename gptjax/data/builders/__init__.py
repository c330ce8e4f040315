"""TFDS builders that need no TensorFlow (array_record + ``as_data_source``)."""

from gptjax.data.builders import splits
from gptjax.data.builders.text_files import (
    SHAKESPEARE_SHA256,
    SHAKESPEARE_URL,
    GptjaxText,
    TextConfig,
    glob_config,
    make_builder,
    prepare,
    shakespeare_config,
    stdlib_config,
    with_validation_split,
)

__all__ = [
    "splits",
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_URL",
    "GptjaxText",
    "TextConfig",
    "glob_config",
    "make_builder",
    "prepare",
    "shakespeare_config",
    "stdlib_config",
    "with_validation_split",
]

"""Reading one image file, failing loudly: a file that cannot be decoded is an error that names
it (timm's ImageDataset would skip it with a warning and train on another sample instead)."""

from __future__ import annotations

__all__ = ["DataError", "load_image"]


class DataError(RuntimeError):
    """A data set cannot be found or read (the message says what to do).

    Raised in a DataLoader worker, torch re-raises it in the main process as
    ``DataError("Caught DataError in DataLoader worker process N.\nOriginal Traceback ...")``;
    the message is cut back to the original one line."""

    def __init__(self, message: str = ""):
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            last = message.rstrip().rsplit("\n", 1)[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def load_image(source, name=None):
    """An image as an RGB PIL image. `source`: a path, or an open binary file (closed here)
    named `name` in messages; a file PIL cannot read (corrupt, truncated, not an image)
    raises a one-line DataError naming it."""
    from PIL import Image

    name = source if name is None else name
    try:
        handle = open(source, "rb") if isinstance(source, str) else source
        with handle:
            return Image.open(handle).convert("RGB")
    except Exception as e:
        raise DataError(f"cannot read image {name} ({type(e).__name__}: {e}); delete or replace "
                        f"the file (or re-extract the data set) and run again") from e

"""The REST service: the HTTP API over :class:`~hypeman_images.build.manager.ImageManager`.

``python -m hypeman_images.service.api`` prints the OpenAPI document.

May import: everything below it (``build`` and what ``build`` may import).
"""

"""The REST service: the HTTP API over :class:`~hypeman_images.build.manager.ImageManager`.

Owns the app and its error responses (``api``), the routes (``routes``), the
request and response bodies (``models``) and the API's bearer token
(``auth``).

``python -m hypeman_images.service.api`` prints the OpenAPI document.

May import: everything below it (``build`` and what ``build`` may import).
"""

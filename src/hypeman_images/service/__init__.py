"""The REST service: the HTTP API over :class:`~hypeman_images.build.manager.ImageManager`.

Owns the app and its error responses (``api``), the routes (``routes``), the
request and response bodies (``models``), the API's bearer token (``auth``;
its FastAPI-free check in ``tokens``), what a client may cost it
(``settings``: the numbers; ``limits``: refusals from the request head,
bounded bodies), the pool for registry-bound calls (``offload``) and the
HTTP server with its connection limits (``server``).

``python -m hypeman_images.service.api`` prints the OpenAPI document.

May import: everything below it (``build`` and what ``build`` may import).
"""

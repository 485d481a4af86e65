"""Shared test infrastructure: a real registry, image builders, the oracle, the disk reader.

Modules: ``registry`` (start docker-registry), ``tar`` (tar writer with raw
PAX), ``images`` (layers, images, indexes, alpine), ``push`` (plain-httpx
pusher), ``multilayer`` (edge-case image + expected tree), ``oracle`` (layer
semantics model), ``disk`` (read an ext4 image back), ``users`` (run as
nobody), ``pushed`` (the PushedImage record the fixtures yield).
"""

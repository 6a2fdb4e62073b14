"""Celery: ``celery -A workers worker`` and ``celery -A workers beat``."""

from workers.celeryapp import app

__all__ = ["app"]

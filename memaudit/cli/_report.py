"""``memaudit report`` commands."""

from __future__ import annotations

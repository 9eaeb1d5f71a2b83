"""``memaudit unlearn`` commands."""

from __future__ import annotations

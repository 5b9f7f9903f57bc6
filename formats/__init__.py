"""Readers and writers of checkpoint formats.

Everything here is lazy on the way in (headers first, bytes on demand) and
streaming on the way out (headers planned up front, bytes written as they come),
so that no caller ever needs a whole model in memory.
"""

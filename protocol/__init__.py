"""Shapes shared by the server and the node agents, and nothing else.

This package depends on the standard library only, so that a node agent (and
later the Blender add-on) can import it without pulling in the server.
"""

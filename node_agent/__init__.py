"""The node agent: runs on each render machine, renders tasks in Blender, uploads frames."""

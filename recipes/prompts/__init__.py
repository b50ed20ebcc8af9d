"""Prompt lists shipped with the recipes (data only: ``minfm:prompts/NAME.txt``, see README.md).

A package of its own so that setuptools ships the folder without warning that it would be
ignored (a data folder inside a package reads to it as an unlisted namespace package).
"""

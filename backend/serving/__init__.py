"""Serving: the models and their scheduler, the projects' versions, answers, prefetch, compute threads."""

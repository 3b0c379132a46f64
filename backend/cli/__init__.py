"""The command-line tools: references (the admin CLI), pre-labeling on Ray, project evaluation."""

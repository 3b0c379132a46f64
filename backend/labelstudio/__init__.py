"""Label Studio's side: its labeling config, request schemas, prompts, regions, API client and images."""

"""Images, captions, latents and membership splits; dataset preparation in data.prepare."""

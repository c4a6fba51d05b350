"""The inference worker: claims queued jobs and turns each radiograph into a SEG and an SR."""

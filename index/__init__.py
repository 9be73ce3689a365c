"""Vector indexes, the passage store, chunking, hybrid search and the batch indexing job."""

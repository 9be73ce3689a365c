"""Talk to a running `kvrag serve` with the official OpenAI Python client.

    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--collection sample] "question"

kvrag's extension fields (collection, k, mode, filter) go in `extra_body`; citations come back as an
extra field of the response (and of the last streamed chunk).
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("question", nargs="?", default="What does a plant need for photosynthesis?")
    p.add_argument("--base-url", default=os.environ.get("KVRAG_URL", "http://127.0.0.1:8000") + "/v1")
    p.add_argument("--collection", default="sample")
    p.add_argument("--k", type=int, default=3)
    args = p.parse_args()
    # The key is only checked when the server sets KVRAG_API_KEY; the client insists on one anyway.
    client = OpenAI(base_url=args.base_url, api_key=os.environ.get("KVRAG_API_KEY", "none"))

    emb = client.embeddings.create(
        model="bundled:multilingual-e5-small", input=["Wie entstehen Vulkane?"], dimensions=128
    )
    print(f"embedding: {len(emb.data[0].embedding)} dims, first {emb.data[0].embedding[:3]}")

    print(f"question: {args.question}\nanswer (streamed): ", end="", flush=True)
    stream = client.chat.completions.create(
        model="kvrag",
        messages=[{"role": "user", "content": args.question}],
        max_tokens=48,
        stream=True,
        extra_body={"collection": args.collection, "k": args.k, "mode": "ape"},
    )
    citations = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        citations = (chunk.model_extra or {}).get("citations") or citations
    print()
    for c in citations:
        print(f"  [{c['rank']}] {c['title'] or c['doc_id']} (passage {c['passage_id']}, {c['source']})")


if __name__ == "__main__":
    main()

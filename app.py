"""The Gradio demo, as Hugging Face Spaces run it: `python app.py [MODEL] [--port 7860]` runs mdf_mllm.demo (also
`python -m mdf_mllm.demo`)."""

from mdf_mllm.demo import main

if __name__ == "__main__":
    main()

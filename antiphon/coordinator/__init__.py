"""The coordinator: the turn loop over model sessions (decide, run, apply).

    from antiphon.coordinator.loop import Coordinator
    from antiphon.coordinator.request import GenerationRequest
    result = await Coordinator(models, tokenizers).generate(GenerationRequest(...))

`request` (what goes in and out), `sessions` (one request's model sessions), `executors`
(one per kind of decision), `commit` (the pure rules that apply an outcome to the state),
`records` (what is logged), `loop` (the turn), `deployment` (the same loop as a Ray Serve
deployment).
"""

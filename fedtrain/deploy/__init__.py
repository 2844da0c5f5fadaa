"""Deployment on Flower's SuperLink and SuperNodes: ``fedtrain server`` and
``fedtrain client``, with everything Flower needs handled here.

- :mod:`~fedtrain.deploy.server`: the coordinator (``serve``) and the
  ``ServerApp`` it submits, which runs the same engine as a simulation;
- :mod:`~fedtrain.deploy.client`: a client (``join``), its SuperNode next to
  its warm trainer, :mod:`~fedtrain.deploy.worker`;
- :mod:`~fedtrain.deploy.superlink`, :mod:`~fedtrain.deploy.supernode`: the
  entry points of the Flower processes they start
  (``python -m fedtrain.deploy superlink|supernode``): a SuperLink whose
  Control and Runtime APIs (unauthenticated in Flower) listen on loopback
  only, the clients' address carrying the Fleet API alone with TLS and
  SuperNode authentication; a SuperNode that runs fedtrain's own app only;
- :mod:`~fedtrain.deploy.app`: that app, and the check refusing any other;
- :mod:`~fedtrain.deploy.flower`: every Flower program, flag, internal and
  log line the deployment relies on, checked against the tested releases;
- :mod:`~fedtrain.deploy.processes`, :mod:`~fedtrain.deploy.addresses`,
  :mod:`~fedtrain.deploy.errors`: supervision of child processes, addresses
  and ports, and the deployment's error.

The coordinator-side transport (``FlowerTransport``) and the light
per-message ``ClientApp`` relay are the lower layer :mod:`fedtrain.transport`.
"""

"""What the tests share, one concept a module (``tests/`` is on the path: ``from support.cli
import headwater``):

- :mod:`support.processes`: processes read from /proc (alive, worker processes, sessions);
- :mod:`support.cli`: the ``headwater`` command, to the end or in the background;
- :mod:`support.kafka`: the Kafka broker of the tests, its fixtures, plain clients;
- :mod:`support.postgres`: the PostgreSQL server of the tests and its fixture;
- :mod:`support.logs`: a pipeline's topics and offsets read from outside;
- :mod:`support.connectors`: connectors driven by hand, as the runtime drives them;
- :mod:`support.values`: pipelines of given values;
- :mod:`support.network`: ports for the servers the tests start;
- :mod:`support.docs`: the code blocks of the documentation pages.

An operator is driven by hand with :class:`pipelines.testing.OperatorHarness`, the harness
users get for their own operators. tests/test_support.py fails when a helper is defined in two
test files: define it here (a fixture: in a conftest.py) and import it.
"""

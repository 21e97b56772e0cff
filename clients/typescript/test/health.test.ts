/** Health checks through the standard grpc.health.v1 service. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { Code, ConnectError, TidingsClient } from "../src/index.js";
import { HealthCheckResponse_ServingStatus } from "../src/gen/grpc/health/v1/health_pb.js";
import { startBroker } from "./support/broker.js";
import { TEST_TIMEOUT, withBroker } from "./support/harness.js";

const SERVICES = ["", "tidings.v1.PublisherService", "tidings.v1.SubscriberService", "tidings.v1.AdminService"];

test("the server and each service are serving", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    for (const service of SERVICES) {
      assert.equal(await client.health(service), "SERVING", service || "(server)");
    }
    // The generated health client, used directly.
    const response = await client.healthService.check({ service: "" });
    assert.equal(response.status, HealthCheckResponse_ServingStatus.SERVING);
  }),
);

test("an unknown service is NotFound", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await assert.rejects(client.health("no.such.Service"), { code: Code.NotFound });
  }),
);

test("a stopped broker is unavailable", { timeout: TEST_TIMEOUT }, async () => {
  const broker = await startBroker();
  const client = new TidingsClient({ ...broker.clientOptions(), timeoutMs: 2000 });
  try {
    assert.equal(await client.health(), "SERVING");
    assert.equal(await broker.stop(), 0);
    await assert.rejects(client.health(), (e: unknown) => ConnectError.from(e).code === Code.Unavailable);
  } finally {
    client.close();
  }
});

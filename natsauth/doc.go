// Package natsauth says who may publish and subscribe to what on drover's
// NATS: the roles (drover, operator, chatbot, fencer, observer) and the exact
// subjects, JetStream API calls included, each may use; the auth file that
// gives nkey users their roles; the two NATS accounts (the service's, with
// JetStream, and the clients', importing only what client roles use) as
// nats-server configuration, for the embedded server and for an external
// one alike; and how a client learns that, and why, the server refused it.
package natsauth

// Package natsauth says who may publish and subscribe to what on drover's
// NATS: the roles (drover, operator, chatbot, fencer, observer) and the exact
// subjects, JetStream API calls included, each may use; the auth file that
// gives nkey users their roles; nats-server permissions for the embedded
// server and the equivalent server configuration for an external cluster; and
// how a client learns that, and why, the server refused it.
package natsauth
